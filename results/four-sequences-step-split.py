"""4 sequences, one token each per step: llama.cpp's own loop on a 4-stream context vs our SharedContext with 4 InfoKV engines
in 4 threads (SmolLM2-135M, FA on, budget 256 + 64, 128 tokens, 3 rounds): ms per step, and the part of it inside
llama_decode. python results/four-sequences-step-split.py"""
import sys, time, threading, statistics
sys.path.insert(0, ".")
import infokv_local.llamacpp.context as C
from llama_cpp import llama_cpp as llama
from infokv_local.engine import Engine
from infokv_local.engine.scheduler import SharedContext
from infokv_local.llamacpp.model import Model
from infokv_local.llamacpp.sampling import SamplingParams
from infokv_local.models.embedded import default_model_path
N = 128
acc = [0.0, 0]
real = llama.llama_decode
def timed(ctx, b):
    t = time.perf_counter(); rc = real(ctx, b); llama.llama_synchronize(ctx); acc[0] += time.perf_counter() - t; acc[1] += 1; return rc
C.llama.llama_decode = timed
with Model(str(default_model_path())) as m:
    prompts = [m.tokenize(f"Question {i}: write a long story about owls.\n\nStory:") for i in range(4)]
    def plain():
        p = llama.llama_context_default_params()
        p.n_ctx = 1280; p.n_batch = p.n_ubatch = 512; p.n_seq_max = 4; p.kv_unified = False
        p.n_threads = p.n_threads_batch = 2; p.no_perf = True
        p.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx = llama.llama_init_from_model(m.ptr, p)
        b = llama.llama_batch_init(512, 0, 4)
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
        toks = []
        for s, pr in enumerate(prompts):
            for j, t in enumerate(pr):
                b.token[j] = t; b.pos[j] = j; b.n_seq_id[j] = 1; b.seq_id[j][0] = s; b.logits[j] = j == len(pr) - 1
            b.n_tokens = len(pr); real(ctx, b)
            toks.append(llama.llama_sampler_sample(chain, ctx, -1))
        acc[:] = [0.0, 0]
        t0 = time.perf_counter()
        for i in range(1, N):
            for s in range(4):
                b.token[s] = toks[s]; b.pos[s] = len(prompts[s]) + i - 1; b.n_seq_id[s] = 1; b.seq_id[s][0] = s; b.logits[s] = True
            b.n_tokens = 4
            timed(ctx, b)
            toks = [llama.llama_sampler_sample(chain, ctx, s) for s in range(4)]
        dt = time.perf_counter() - t0
        llama.llama_batch_free(b); llama.llama_sampler_free(chain); llama.llama_free(ctx)
        return dt / (N - 1) * 1e3, acc[0] / acc[1] * 1e3
    def ours():
        sc = SharedContext.for_policies(m, 4, ["infokv"], 320, n_threads=2, flash_attn=True)
        engines = [Engine(m, "infokv", budget=256, buffer=64, n_threads=2, shared=sc) for _ in range(4)]
        gens = [e.generate(p, N, SamplingParams(temperature=0.0), ignore_eos=True) for e, p in zip(engines, prompts)]
        for g in gens: next(g)
        bar = threading.Barrier(4)
        def run(g):
            bar.wait(); sum(1 for _ in g)
        ths = [threading.Thread(target=run, args=(g,)) for g in gens]
        acc[:] = [0.0, 0]
        t0 = time.perf_counter()
        for t in ths: t.start()
        for t in ths: t.join()
        dt = time.perf_counter() - t0
        steps, batches = acc[1], sc.batches
        for e in engines: e.close()
        sc.close()
        return dt / (N - 1) * 1e3, acc[0] / max(acc[1], 1) * 1e3, steps
    for r in range(3):
        pw, pd = plain()
        ow, od, steps = ours()
        print(f"round {r}: plain {pw:5.2f} ms/step (decode {pd:5.2f}) | ours {ow:5.2f} ms/step (decode {od:5.2f}, {steps} decodes for {N-1} steps)", flush=True)
