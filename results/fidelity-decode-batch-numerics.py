"""Qwen2.5-Coder-1.5B Q4_K_M, one GSM8K trace (question 1201, 200 tokens, from results/fidelity-decode-parallel-ab.py's
traces): 8 configs replayed one by one and together (8 sequences of one context), per-config KL compared.
Usage: python results/fidelity-decode-batch-numerics.py DIR_WITH_traces.jsonl  (output: the .log beside it)"""
import json, sys, numpy as np
from evaluation import decode_fidelity as D
from infokv_local.llamacpp.model import Model
from infokv_local.models.registry import resolve_model_path
d = sys.argv[1]
tr = [json.loads(l) for l in open(f"{d}/traces.jsonl")][1]
m = Model(resolve_model_path("qwen2.5-coder-1.5b"))
cfgs = [(p, r) for p in ("streaming", "keydiff", "h2o", "snapkv") for r in ("r0.25", "r0.125")]
a = D.replay_trace(m, tr, cfgs, buffer=64, n_threads=2, flash_attn=False)
b = D.replay_trace(m, tr, cfgs, buffer=64, n_threads=2, flash_attn=False, parallel=8)
for k in cfgs:
    x, y = np.array(a[k]["kl"]), np.array(b[k]["kl"])
    print(k, np.array_equal(x, y), float(np.max(np.abs(x - y))), round(x.mean(), 5), round(y.mean(), 5), flush=True)
