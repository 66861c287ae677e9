// Per-step hot kernels for infokv-local, compiled with cffi against the llama.cpp headers shipped in
// the installed llama-cpp-python wheel (see native/build_kernels.py).
//
// topk_entropy: entropy of the softmax restricted to the k largest logits of each row
// (InfoKV, arXiv 2606.26875: top-k restricted predictive entropy, k = 256 in the paper).

#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <vector>

static float row_topk_entropy(const float * row, int64_t n_vocab, int64_t k, std::vector<float> & scratch) {
    const float * vals = row;
    int64_t n = n_vocab;
    if (k > 0 && k < n_vocab) {
        // linear-time selection of the k largest logits (ties at the threshold: any k of them)
        scratch.assign(row, row + n_vocab);
        std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
        vals = scratch.data();
        n = k;
    }
    float m = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
        m = std::max(m, vals[i]);
    }
    if (!std::isfinite(m)) {
        return NAN;
    }
    // H = log Z - sum(e^(x-m) (x-m)) / Z, accumulated in double for large vocabularies
    double z = 0.0, zx = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const double d = (double) vals[i] - m;
        const double e = std::exp(d);
        z  += e;
        zx += e * d;
    }
    return (float) (std::log(z) - zx / z);
}

extern "C" {

// entropies of n_rows contiguous rows of n_vocab logits; k <= 0 or k >= n_vocab means the full vocabulary
void infokv_topk_entropy(const float * logits, int64_t n_rows, int64_t n_vocab, int64_t k, float * out) {
    std::vector<float> scratch;
    for (int64_t r = 0; r < n_rows; ++r) {
        out[r] = row_topk_entropy(logits + r*n_vocab, n_vocab, k, scratch);
    }
}

// the same, reading the output rows idx[0..n_idx) of the last decode directly from the context
// (llama_get_logits_ith), without copying the logits into Python; NaN for a row without logits
void infokv_topk_entropy_ctx(struct llama_context * ctx, const int32_t * idx, int64_t n_idx, int64_t n_vocab,
                             int64_t k, float * out) {
    std::vector<float> scratch;
    for (int64_t r = 0; r < n_idx; ++r) {
        const float * row = llama_get_logits_ith(ctx, idx[r]);
        out[r] = row ? row_topk_entropy(row, n_vocab, k, scratch) : NAN;
    }
}

// eval-callback route (tests and diagnostics): name and shape of a graph tensor seen by
// ggml_backend_sched_eval_callback, and a copy of an F32 tensor's data from whatever backend holds it
int infokv_tensor_desc(const struct ggml_tensor * t, char * name, int64_t name_cap, int64_t * ne) {
    snprintf(name, (size_t) name_cap, "%s", ggml_get_name(t));
    for (int i = 0; i < 4; ++i) {
        ne[i] = t->ne[i];
    }
    return t->type == GGML_TYPE_F32 && ggml_is_contiguous(t) ? 1 : 0;
}

void infokv_tensor_f32(const struct ggml_tensor * t, float * out) {
    ggml_backend_tensor_get(t, out, 0, ggml_nbytes(t));
}

}
