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
#include <thread>
#include <vector>

// The k largest values of row[0..n) copied into out (in no order). Exact: a threshold t is guessed from a
// strided sample (about twice the share of the sample that the top k are of the row), every value >= t is
// collected in one pass, and the k largest are selected among those; when fewer than k pass the guess (a
// row with many equal values, or an unlucky sample), the whole row is selected from instead.
static void top_k_values(const float * row, int64_t n, int64_t k, std::vector<float> & out,
                         std::vector<float> & sample) {
    const int64_t n_sample = std::min<int64_t>(n, 2048);
    const int64_t stride = n / n_sample;
    int64_t rank = std::min<int64_t>(n_sample - 1, (2 * k * n_sample + n - 1) / n);  // 0-based
    out.clear();
    if (stride > 1 && rank < n_sample - 1) {
        sample.resize((size_t) n_sample);
        for (int64_t i = 0; i < n_sample; ++i) {
            sample[i] = row[i * stride];
        }
        std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<float>());
        const float t = sample[rank];
        for (int64_t i = 0; i < n; ++i) {
            if (row[i] >= t) {
                out.push_back(row[i]);
            }
        }
    }
    if ((int64_t) out.size() < k) {
        out.assign(row, row + n);
    }
    std::nth_element(out.begin(), out.begin() + (k - 1), out.end(), std::greater<float>());
    out.resize((size_t) k);
}

static float row_topk_entropy(const float * row, int64_t n_vocab, int64_t k, std::vector<float> & scratch,
                              std::vector<float> & sample) {
    const float * vals = row;
    int64_t n = n_vocab;
    if (k > 0 && k < n_vocab) {
        // ties at the k-th value: any k of them (the entropy is the same)
        top_k_values(row, n_vocab, k, scratch, sample);
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

// rows [0, n_rows) split over n_threads threads (the caller's thread takes the first share); rows are
// independent, so the result does not depend on the thread count
template <typename RowFn>
static void for_rows(int64_t n_rows, int n_threads, RowFn fn) {
    const int64_t n_workers = std::max<int64_t>(1, std::min<int64_t>(n_threads, n_rows / 16));
    auto run = [&](int64_t w) {
        std::vector<float> scratch, sample;
        for (int64_t r = w * n_rows / n_workers; r < (w + 1) * n_rows / n_workers; ++r) {
            fn(r, scratch, sample);
        }
    };
    std::vector<std::thread> workers;
    for (int64_t w = 1; w < n_workers; ++w) {
        workers.emplace_back(run, w);
    }
    run(0);
    for (auto & t : workers) {
        t.join();
    }
}

extern "C" {

// entropies of n_rows contiguous rows of n_vocab logits; k <= 0 or k >= n_vocab means the full vocabulary
void infokv_topk_entropy(const float * logits, int64_t n_rows, int64_t n_vocab, int64_t k, float * out,
                         int32_t n_threads) {
    for_rows(n_rows, n_threads, [&](int64_t r, std::vector<float> & scratch, std::vector<float> & sample) {
        out[r] = row_topk_entropy(logits + r*n_vocab, n_vocab, k, scratch, sample);
    });
}

// the same, reading the output rows idx[0..n_idx) of the last decode directly from the context
// (llama_get_logits_ith), without copying the logits into Python; NaN for a row without logits
void infokv_topk_entropy_ctx(struct llama_context * ctx, const int32_t * idx, int64_t n_idx, int64_t n_vocab,
                             int64_t k, float * out, int32_t n_threads) {
    std::vector<const float *> rows((size_t) n_idx);
    for (int64_t r = 0; r < n_idx; ++r) {  // llama_get_logits_ith is not documented as thread-safe: ask here
        rows[r] = llama_get_logits_ith(ctx, idx[r]);
    }
    for_rows(n_idx, n_threads, [&](int64_t r, std::vector<float> & scratch, std::vector<float> & sample) {
        out[r] = rows[r] ? row_topk_entropy(rows[r], n_vocab, k, scratch, sample) : NAN;
    });
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
