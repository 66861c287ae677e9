"""Decode speed of several sequences in one llama.cpp context against one at a time, side by side in one run.

    python -m infokv_local bench sequences [--model PATH] [--sequences 1,2,4,8] [--cached 16,256]
        [--budget 256] [--buffer 64] [--max-tokens 96] [--threads 2] [--rounds 2] [--json sequences.json]

Two parts, rounds interleaved, medians reported:

- **llama.cpp alone** (the patched library with the statistics off): N sequences of ``--cached`` tokens each,
  one token per sequence per ``llama_decode``, with the sequences in one cell array (``kv_unified``: the
  mask keeps them apart, every row's attention spans every sequence's cells) and in per-sequence streams
  (each row attends over its own stream), against one sequence. This is what batching can gain at most.
- **the engine**: N engines on one :class:`~infokv_local.engine.SharedContext`, each generating
  ``--max-tokens`` greedily on a thread of its own (InfoKV at ``--budget`` + ``--buffer``, the prompt probe
  on, flash attention off), with a stream per sequence (the default on this model's plain cache) and with
  one unified cache, against the same N engines one after another. Each prompt (about 300 tokens) is
  longer than the budget, so every engine compresses it and evicts while it generates. Aggregate tokens/s
  over the wall time, prompts included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from ..settings import DEFAULTS
from .arg_types import int_list


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sequences", type=int_list, default=[1, 2, 4, 8], help="sequences per batch (default: 1,2,4,8)")
    p.add_argument("--cached", type=int_list, default=[16, 256],
                   help="tokens each sequence holds in the llama.cpp part (default: 16,256)")
    p.add_argument("--budget", type=int, default=DEFAULTS.budget)
    p.add_argument("--buffer", type=int, default=DEFAULTS.buffer)
    p.add_argument("--max-tokens", type=int, default=96, help="tokens each engine generates (default: 96)")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed in the llama.cpp part (default: 32)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded to a GPU (999: all; default 0)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="write the figures here")


def raw_step_s(model: Any, n_seq: int, cached: int, unified: bool, threads: int, steps: int) -> float:
    """Seconds per decode of one token for each of ``n_seq`` sequences holding ``cached`` tokens."""
    from llama_cpp import llama_cpp as llama

    toks = model.tokenize("The most important thing to understand about long reasoning is that every step " * 64)
    p = llama.llama_context_default_params()
    p.n_ctx = n_seq * (cached + steps + 16)
    p.n_batch = p.n_ubatch = max(cached, n_seq, 32)
    p.n_seq_max, p.kv_unified = n_seq, unified
    p.n_threads = p.n_threads_batch = threads
    p.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
    p.no_perf = True
    ctx = llama.llama_init_from_model(model.ptr, p)
    if not ctx:
        raise RuntimeError("llama.cpp could not create the context")
    b = llama.llama_batch_init(p.n_batch, 0, 1)
    try:
        def decode(items: list[tuple[int, list[int], int]]) -> None:
            i = 0
            for seq, part, start in items:
                for j, t in enumerate(part):
                    b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, start + j, 1, j == len(part) - 1
                    b.seq_id[i][0] = seq
                    i += 1
            b.n_tokens = i
            if llama.llama_decode(ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            llama.llama_synchronize(ctx)

        for s in range(n_seq):
            decode([(s, toks[:cached], 0)])
        t0 = time.perf_counter()
        for k in range(steps):
            decode([(s, [toks[cached + k]], cached + k) for s in range(n_seq)])
        return (time.perf_counter() - t0) / steps
    finally:
        llama.llama_batch_free(b)
        llama.llama_free(ctx)


def engine_run_s(model: Any, n_seq: int, args: argparse.Namespace, mode: str) -> tuple[float, float]:
    """Wall seconds for ``n_seq`` engines to read their prompts and generate ``args.max_tokens`` each, and the
    seconds of the generation alone: one by one (``alone``, ``one by one``: the sum of each engine's), or
    together in one context (``streams``, ``unified``: every engine reads its prompt, then they all start
    generating at once)."""
    from ..engine import Engine, SharedContext

    prompts = [model.tokenize(f"Note {i}. Every step of a long proof depends on the steps before it. " * 18)
               for i in range(n_seq)]  # about 300 tokens: longer than the default budget
    kw = dict(policy="infokv", budget=args.budget, buffer=args.buffer, n_threads=args.threads, flash_attn=False,
              prompt_probe=True)
    t0 = time.perf_counter()
    if mode in ("alone", "one by one"):
        gen = 0.0
        for p in prompts:
            with Engine(model, **kw) as e:
                e.prefill(p)
                g0 = time.perf_counter()
                for _ in e.generate([], args.max_tokens, ignore_eos=True):
                    pass
                gen += time.perf_counter() - g0
        return time.perf_counter() - t0, gen
    start = threading.Barrier(n_seq)
    began: list[float] = []
    with SharedContext.for_policies(model, n_seq, ["infokv"], capacity=args.budget + args.buffer,
                                    n_threads=args.threads, flash_attn=False,
                                    kv_unified=mode == "unified") as shared:
        def work(p: list[int]) -> None:
            with Engine(model, shared=shared, **kw) as e:
                e.prefill(p)
                if start.wait() == 0:
                    began.append(time.perf_counter())
                for _ in e.generate([], args.max_tokens, ignore_eos=True):
                    pass

        threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    end = time.perf_counter()
    return end - t0, end - began[0]


def run(args: argparse.Namespace) -> int:
    from ..llamacpp.model import Model
    from ..models.embedded import default_model_path

    model = Model(args.model or default_model_path(), n_gpu_layers=args.gpu_layers)
    raw: dict[tuple[int, int, str], list[float]] = {}
    eng: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for cached in args.cached:
            for n in args.sequences:
                for layout in (("unified",) if n == 1 else ("unified", "streams")):
                    raw.setdefault((cached, n, layout), []).append(
                        raw_step_s(model, n, cached, layout == "unified", args.threads, args.steps))
        for n in args.sequences:
            for mode in (("alone",) if n == 1 else ("one by one", "streams", "unified")):
                eng.setdefault((n, mode), []).append(engine_run_s(model, n, args, mode))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows: list[dict[str, Any]] = []
    print("\nllama.cpp alone: aggregate decode tok/s (one token per sequence per decode), ratio to one sequence")
    for cached in args.cached:
        one = args.sequences[0] / statistics.median(raw[(cached, args.sequences[0], "unified")])
        for (c, n, layout), times in raw.items():
            if c != cached:
                continue
            tps = n / statistics.median(times)
            rows.append({"part": "llama.cpp", "cached": c, "sequences": n, "layout": layout, "tok_s": tps,
                         "ratio": tps / one})
            print(f"  {c:5d} cached  {n} seq  {layout:8s} {tps:7.1f} tok/s  {tps / one:5.2f}x")
    print(f"\nengine (infokv, budget {args.budget} + {args.buffer}, {args.max_tokens} tokens each): aggregate "
          f"generated tok/s over the generation alone, and over the wall time with the prompts read")

    def rate(i: int, key: tuple[int, str]) -> float:  # i: 0 over the wall time, 1 over the generation
        return key[0] * args.max_tokens / statistics.median(t[i] for t in eng[key])

    for n, mode in eng:
        ref = (n, "one by one") if n > 1 else (n, mode)
        gen, wall = rate(1, (n, mode)), rate(0, (n, mode))
        rows.append({"part": "engine", "sequences": n, "mode": mode, "generation_tok_s": gen,
                     "generation_ratio": gen / rate(1, ref), "wall_tok_s": wall, "wall_ratio": wall / rate(0, ref)})
        print(f"  {n} seq  {mode:10s} generation {gen:7.1f} tok/s {gen / rate(1, ref):5.2f}x   with prompts "
              f"{wall:7.1f} tok/s {wall / rate(0, ref):5.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(model.path), "threads": args.threads, "gpu_layers": args.gpu_layers, "rounds": args.rounds,
            "steps": args.steps, "budget": args.budget, "buffer": args.buffer, "max_tokens": args.max_tokens,
            "rows": rows}, indent=1))
    model.close()
    return 0
