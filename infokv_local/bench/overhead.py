"""Throughput cost of the patch and its statistics, side by side in one run.

    python -m infokv_local.bench.overhead [--model PATH] [--n-ctx 2048] [--prompt 1024] [--gen 128]
                                          [--rounds 3] [--json bench-overhead.json]

Configurations, each in its own process (the stock one loads the unpatched libllama through
LLAMA_CPP_LIB_PATH), interleaved round by round so that machine noise hits them alike; the figure
of each is the median over rounds:

- ``stock``: llama.cpp without the patches, flash attention off (what the statistics need);
- ``patched_off``: the patched library, statistics off;
- ``patched_on``: statistics on (attention mass with a 32-row window, layer distances);
- ``signals``: the full per-call Signals as infokv-local collects them (statistics on, top-k entropy
  of every output row with the native kernel, the cell map and host copies), through StatsContext.

Prefill is timed twice: only the last token as output (plain generation) and every token as output
(what entropy and layer distances need: the LM head runs on every token).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..llamacpp.threads import default_threads
from .plain_decode import PlainDecoder

CONFIGS = ("stock", "patched_off", "patched_on", "signals")
ROOT = Path(__file__).resolve().parents[2]
TEXT = (
    "It is a truth universally acknowledged that a long chain of reasoning needs a long memory. "
    "Each step builds on the facts established before it, and the model must keep them at hand. "
)


def _worker(cfg: str, model_path: str, n_ctx: int, n_prompt: int, n_gen: int, n_batch: int, threads: int,
            inner: int) -> dict:
    from llama_cpp import llama_cpp as llama

    quiet = llama.llama_log_callback(lambda *_: None)  # keep a reference: llama.cpp calls it later
    llama.llama_log_set(quiet, None)
    llama.llama_backend_init()
    mparams = llama.llama_model_default_params()
    model = llama.llama_model_load_from_file(model_path.encode(), mparams)
    vocab = llama.llama_model_get_vocab(model)
    raw = (TEXT * (n_prompt // 20 + 8)).encode()
    buf = (llama.llama_token * (len(raw) + 8))()
    n = llama.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)
    tokens = list(buf[:n])[: n_prompt + n_gen]
    if len(tokens) != n_prompt + n_gen:
        raise RuntimeError(f"the benchmark text gave {len(tokens)} tokens, {n_prompt + n_gen} needed")

    if cfg == "signals":
        from infokv_local.llamacpp.context import StatsContext
        from infokv_local.llamacpp.model import Model

        m = Model(model_path)
        ctx = StatsContext(m, n_ctx=n_ctx, n_batch=n_batch, n_last_rows=32, n_threads=threads)

        def run_prefill(all_outputs: bool) -> float:
            ctx.clear()
            t0 = time.perf_counter()
            for s in range(0, n_prompt, n_batch):
                ctx.decode(tokens[s : s + n_batch], s, all_outputs=all_outputs)
            return time.perf_counter() - t0

        def run_decode() -> float:
            t0 = time.perf_counter()
            for i in range(n_gen):
                ctx.decode([tokens[n_prompt + i]], n_prompt + i)
            return time.perf_counter() - t0
    else:
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx_ptr = llama.llama_init_from_model(model, cparams)
        if cfg == "patched_on":
            from infokv_local.llamacpp import library as native

            native.require_patched()
            if native.lib.llama_infokv_set_stats(ctx_ptr, True, 32, True) != 0:  # not an assert: gone under -O
                raise RuntimeError("llama_infokv_set_stats failed")
        elif cfg == "patched_off":
            from infokv_local.llamacpp import library as native

            native.require_patched()
        decode = PlainDecoder(ctx_ptr, n_batch)
        mem = llama.llama_get_memory(ctx_ptr)

        def run_prefill(all_outputs: bool) -> float:
            llama.llama_memory_clear(mem, True)
            t0 = time.perf_counter()
            for s in range(0, n_prompt, n_batch):
                decode(tokens[s : s + n_batch], s, all_outputs)
            return time.perf_counter() - t0

        def run_decode() -> float:
            t0 = time.perf_counter()
            for i in range(n_gen):
                decode([tokens[n_prompt + i]], n_prompt + i, True)
            return time.perf_counter() - t0

    run_prefill(False)  # warm-up: graph allocation, page cache
    # best of `inner` repeats: the least disturbed run of each measurement on a shared machine
    t_last = min(run_prefill(False) for _ in range(inner))
    t_all = t_dec = float("inf")
    for _ in range(inner):
        t_all = min(t_all, run_prefill(True))
        t_dec = min(t_dec, run_decode())  # decodes after the prompt just prefilled
    return {
        "prefill_tps_last_output": n_prompt / t_last,
        "prefill_tps_all_outputs": n_prompt / t_all,
        "decode_tps": n_gen / t_dec,
    }


def stock_lib_dir() -> str:
    """Folder of the unpatched libllama (built once or reused, as ``python -m infokv_local install --stock``)."""
    from ..install.llama import stock_lib_dir as build_or_reuse

    return str(build_or_reuse())


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """This benchmark's options (on its own parser, or on ``python -m infokv_local bench overhead``)."""
    ap.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M)")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens to prefill")
    ap.add_argument("--gen", type=int, default=128, help="single-token decode steps after the prompt")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--inner", type=int, default=3, help="repeats inside each process; the best is kept")
    ap.add_argument("--stock-lib", help="folder of the unpatched libllama (default: build or reuse it)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        ap.error(str(e))


def run(args: argparse.Namespace) -> None:
    """Run the benchmark with parsed options; ``ValueError`` on options that do not fit together."""
    if args.model is None:
        from infokv_local.models.embedded import default_model_path

        args.model = str(default_model_path())
    if args.prompt + args.gen > args.n_ctx:
        raise ValueError("--prompt + --gen must fit in --n-ctx")

    if args.worker:
        res = _worker(args.worker, args.model, args.n_ctx, args.prompt, args.gen, args.batch, args.threads,
                      args.inner)
        print(json.dumps(res))
        return

    stock_lib = args.stock_lib or stock_lib_dir()
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        for cfg in CONFIGS:
            env = dict(os.environ)
            env.pop("LLAMA_CPP_LIB_PATH", None)
            if cfg == "stock":
                env["LLAMA_CPP_LIB_PATH"] = stock_lib
            cmd = [sys.executable, "-m", "infokv_local.bench.overhead", "--worker", cfg, "--model", args.model,
                   "--n-ctx", str(args.n_ctx), "--prompt", str(args.prompt), "--gen", str(args.gen),
                   "--batch", str(args.batch), "--threads", str(args.threads), "--inner", str(args.inner)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            runs[cfg].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {cfg:12s} {runs[cfg][-1]}", file=sys.stderr, flush=True)

    metrics = ("prefill_tps_last_output", "prefill_tps_all_outputs", "decode_tps")
    median = {c: {m: statistics.median(x[m] for x in runs[c]) for m in metrics} for c in CONFIGS}
    ratios = {
        f"{a}/{b}": {m: median[a][m] / median[b][m] for m in metrics}
        for a, b in (("patched_off", "stock"), ("patched_on", "patched_off"), ("patched_on", "stock"),
                     ("signals", "patched_off"))
    }
    print(f"\nmodel {Path(args.model).name}, n_ctx {args.n_ctx}, prompt {args.prompt}, decode {args.gen}, "
          f"batch {args.batch}, threads {args.threads}, "
          f"median of {args.rounds} interleaved rounds of best-of-{args.inner} (tokens/s)")
    print(f"{'config':14s}{'prefill(last out)':>20s}{'prefill(all out)':>20s}{'decode':>12s}")
    for c in CONFIGS:
        print(f"{c:14s}" + "".join(f"{median[c][m]:>{w}.1f}" for m, w in zip(metrics, (20, 20, 12), strict=True)))
    print(f"\n{'ratio':24s}{'prefill(last out)':>20s}{'prefill(all out)':>20s}{'decode':>12s}")
    for k, v in ratios.items():
        print(f"{k:24s}" + "".join(f"{v[m]:>{w}.3f}" for m, w in zip(metrics, (20, 20, 12), strict=True)))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "n_ctx": args.n_ctx, "prompt": args.prompt, "gen": args.gen,
            "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "inner": args.inner,
            "runs": runs, "median": median, "ratios": ratios,
        }, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
