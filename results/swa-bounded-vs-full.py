"""llama.cpp alone (no infokv code: the raw API): Gemma 3 270M with its bounded sliding-window cache against a
full-size one (swa_full), the same tokens read in the same 32-token chunks, flash attention off; the max KL over
the next 64 tokens. Needs /tmp/prof/gemma/toks.json (the model path, 2,404 tokens of the test essay and 64 more,
written by the patched environment); run with LLAMA_CPP_LIB_PATH=<stock lib dir> for stock llama.cpp.
Usage: python results/swa-bounded-vs-full.py N   (N prompt tokens, then 4 single-token decodes)"""
import sys, ctypes, json, numpy as np
from llama_cpp import llama_cpp as llama
D = json.load(open("/tmp/prof/gemma/toks.json"))
N = int(sys.argv[1]); nv = D["nv"]
llama.llama_backend_init()
mp = llama.llama_model_default_params()
m = llama.llama_model_load_from_file(D["path"].encode(), mp)
toks = D["toks"][:N] + D["toks"][2400:2404]; text = D["text"]
def kl(p, q):
    p = p - p.max(); q = q - q.max(); lp = p - np.log(np.exp(p).sum()); lq = q - np.log(np.exp(q).sum())
    return float((np.exp(lp) * (lp - lq)).sum())
def ctx(swa_full):
    p = llama.llama_context_default_params()
    p.n_ctx = N + 200; p.n_batch = p.n_ubatch = 32; p.n_threads = p.n_threads_batch = 2
    p.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED; p.swa_full = swa_full; p.n_seq_max = 1
    return llama.llama_init_from_model(m, p)
b = llama.llama_batch_init(32, 0, 1)
def decode(c, part, start, logits_all):
    for j, t in enumerate(part):
        b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = t, start + j, 1, logits_all or j == len(part) - 1
        b.seq_id[j][0] = 0
    b.n_tokens = len(part)
    assert llama.llama_decode(c, b) == 0
    if logits_all:
        return np.ctypeslib.as_array(llama.llama_get_logits(c), shape=(len(part), nv)).copy()
def run(c):
    for s in range(0, N, 32):
        decode(c, toks[s:min(s + 32, N)], s, False)
    for k in range(4):
        decode(c, [toks[N + k]], N + k, False)
    return np.concatenate([decode(c, text[s:s + 32], N + 4 + s, True) for s in range(0, 64, 32)])
ta = run(ctx(False)); tf = run(ctx(True))
print(f"N={N}: bounded vs full-size sliding-window cache, max KL over 64 tokens: {max(kl(p, q) for p, q in zip(ta, tf)):.4f}")
