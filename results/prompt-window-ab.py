"""A/B in one process: a 1,024-token prompt into 1,152 cells (budget 1024 + 128), InfoKV, the prompt's batches
with the attention window always (the rule before) vs only when a compression may read them (now); plain
llama.cpp on the same library for reference. SmolLM2-135M, 2 threads, 5 interleaved rounds, medians."""
import sys, time, statistics
sys.path.insert(0, ".")
from llama_cpp import llama_cpp as llama
from infokv_local.engine import Engine
from infokv_local.engine.compression import Compressor
from infokv_local.llamacpp.model import Model
from infokv_local.llamacpp.sampling import SamplingParams
from infokv_local.models.embedded import default_model_path
from infokv_local.bench.plain_decode import PlainDecoder
from infokv_local.bench.speed import _prompt_tokens
new_rule = Compressor.attention_needed
def old_rule(self, n_new):
    e = self.engine
    return n_new > 1 or e.capacity - e.ctx.n_used - n_new < e.window
with Model(str(default_model_path())) as m:
    prompt = _prompt_tokens(m.tokenize, 1024)
    def plain(fa):
        p = llama.llama_context_default_params()
        p.n_ctx = 1544; p.n_batch = p.n_ubatch = 512; p.n_threads = p.n_threads_batch = 2; p.no_perf = True
        p.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if fa else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = llama.llama_init_from_model(m.ptr, p)
        dec = PlainDecoder(ctx, 512)
        t = time.perf_counter()
        for s in range(0, 1024, 512): dec(prompt[s:s+512], s)
        dt = time.perf_counter() - t
        dec.close(); llama.llama_free(ctx)
        return 1024 / dt
    def ours(fa, rule):
        Compressor.attention_needed = rule
        with Engine(m, "infokv", budget=1024, buffer=128, n_threads=2, flash_attn=fa, max_context=1544) as e:
            t = time.perf_counter(); e.prefill(prompt); dt = time.perf_counter() - t
            assert e.totals.evictions == 0
        Compressor.attention_needed = new_rule
        return 1024 / dt
    res = {}
    for r in range(5):
        for fa in (True, False):
            k = "on" if fa else "off"
            res.setdefault(f"plain FA {k}", []).append(plain(fa))
            res.setdefault(f"infokv FA {k}, window always", []).append(ours(fa, old_rule))
            res.setdefault(f"infokv FA {k}, window when read", []).append(ours(fa, new_rule))
    med = {k: statistics.median(v) for k, v in res.items()}
    for k, v in res.items():
        base = med["plain FA " + ("on" if "on" in k.split(",")[0] else "off")]
        print(f"{k:34s} {med[k]:6.1f} tok/s ({med[k] / base:.3f}x plain, same FA)  rounds {[round(x) for x in v]}")
