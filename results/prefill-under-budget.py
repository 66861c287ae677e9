import sys, time
from infokv_local.engine import Engine
from infokv_local.llamacpp.model import Model
from infokv_local.llamacpp.sampling import SamplingParams
from infokv_local.models.embedded import default_model_path
from infokv_local.bench.speed import _prompt_tokens
n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
with Model(str(default_model_path())) as m:
    prompt = _prompt_tokens(m.tokenize, n)
    cfgs = [("full", {}, False), ("streaming", {}, False), ("infokv", {}, False), ("infokv", {}, True),
            ("snapkv", {}, True)]
    for rnd in range(2):
        for pol, kw, probe in cfgs:
            with Engine(m, pol, budget=256, buffer=64, n_threads=2, max_context=n + 16, flash_attn=True,
                        prompt_probe=probe) as e:
                t0 = time.perf_counter()
                g = e.generate(prompt, 2, SamplingParams(temperature=0.0), ignore_eos=True)
                next(g)
                dt = time.perf_counter() - t0
                t = e.totals
                print(f"r{rnd} {pol:10s} probe={probe!s:5s} prefill {dt:6.2f}s {n/dt:6.0f} tok/s  compr {t.evictions:3d} "
                      f"score {t.score_s:5.2f}s evict {t.evict_s:5.2f}s decode {t.decode_s:5.2f}s probes {e.probes}", flush=True)
