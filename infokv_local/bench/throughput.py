"""Generation speed under a budget, per policy, against llama-cpp-python itself, side by side in one run.

    python -m infokv_local bench throughput [--model PATH] [--budget 256] [--buffer 64]
        [--prompt-tokens 1024] [--max-tokens 256] [--policies full,streaming,h2o,snapkv,tova,infokv]
        [--rounds 3] [--json throughput.json]

Every configuration completes the same prompt (the start of an essay) greedily for the same number
of tokens. ``llama-cpp-python`` is ``llama_cpp.Llama.create_completion`` streaming through the same
(patched, statistics off) library with a context large enough for everything; every other row is
``InfoKVLlama.create_completion`` streaming with that policy (``full``: no eviction and no
statistics, i.e. the cost of this package's Python path alone). Rounds are interleaved so that
machine noise hits all configurations alike; each figure is the median over rounds. Prefill is
timed to the first streamed token, decode from there to the last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from ..llamacpp.threads import default_threads
from ..settings import DEFAULTS

BASELINE = "llama-cpp-python"


def essay_text(n_chars: int = 40_000) -> str:
    """Enough English prose for a long prompt: the offline essays if installed, else a repeated paragraph."""
    from .documents import essay_files

    try:
        text = "\n\n".join(p.read_text() for p in essay_files()[:8])
    except ValueError:  # not installed
        text = ""
    if len(text) >= n_chars:
        return text[:n_chars]
    para = ("Every step of a long argument depends on the steps before it, and a reader who forgets an early "
            "fact cannot use it later. ")
    return para * (n_chars // len(para) + 1)


def _time_stream(chunks: Any) -> tuple[float, float, dict[str, Any]]:
    """(prefill seconds, decode seconds, last chunk) of a completion stream started just before."""
    t0 = time.perf_counter()
    t_first = None
    last: dict[str, Any] = {}
    for c in chunks:
        if t_first is None and c["choices"][0]["text"]:
            t_first = time.perf_counter()
        last = c
    end = time.perf_counter()
    t_first = t_first or end
    return t_first - t0, end - t_first, last


def run_throughput(model_path: str, policies: list[str], budget: int, buffer: int, prompt_tokens: int,
                   max_tokens: int, rounds: int, n_threads: int) -> dict[str, Any]:
    from llama_cpp import Llama

    from ..api import InfoKVLlama
    from ..api.text_stream import token_bytes
    from ..llamacpp.model import Model

    model = Model(model_path)
    text = essay_text()
    prompt_ids = model.tokenize(text)[:prompt_tokens]
    prompt = b"".join(token_bytes(model, t) for t in prompt_ids).decode("utf-8", "replace")
    n_prompt = len(model.tokenize(prompt))
    base = Llama(model_path, n_ctx=n_prompt + max_tokens + 64, n_batch=512, n_threads=n_threads,
                 n_threads_batch=n_threads, verbose=False, seed=0)
    llms = {p: InfoKVLlama(model, policy=p, budget=budget, buffer=buffer, n_threads=n_threads) for p in policies}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [BASELINE, *policies]}
    try:
        for _ in range(rounds):
            base.reset()
            pre, dec, last = _time_stream(
                base.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True))
            # its chunks carry text only: a run cut by max_tokens made exactly max_tokens tokens
            n_out = max_tokens if last["choices"][0]["finish_reason"] == "length" else base.n_tokens - n_prompt + 1
            runs[BASELINE].append({"prefill_s": pre, "decode_s": dec, "prompt_tokens": n_prompt,
                                   "completion_tokens": n_out, "max_used_cells": base.n_tokens})
            for p, llm in llms.items():
                llm.reset()
                pre, dec, last = _time_stream(
                    llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True))
                u = last["usage"]
                runs[p].append({"prefill_s": pre, "decode_s": dec, "prompt_tokens": u["prompt_tokens"],
                                "completion_tokens": u["completion_tokens"],
                                "max_used_cells": u["kv"]["max_used_cells"],
                                "evicted_tokens": u["kv"]["evicted_tokens"]})
    finally:
        for llm in llms.values():
            llm.close()
        base.close()
        model.close()
    rows = {}
    for name, rs in runs.items():
        rows[name] = {
            "prefill_tok_s": statistics.median(r["prompt_tokens"] / max(r["prefill_s"], 1e-9) for r in rs),
            "decode_tok_s": statistics.median(max(r["completion_tokens"] - 1, 0) / max(r["decode_s"], 1e-9)
                                              for r in rs),
            "completion_tokens": rs[-1]["completion_tokens"],
            "max_used_cells": max(r["max_used_cells"] for r in rs),
            "evicted_tokens": rs[-1].get("evicted_tokens", 0),
            "runs": rs,
        }
    ref = rows[BASELINE]
    for r in rows.values():
        r["prefill_ratio"] = r["prefill_tok_s"] / ref["prefill_tok_s"]
        r["decode_ratio"] = r["decode_tok_s"] / ref["decode_tok_s"]
    return {"model": model_path, "budget": budget, "buffer": buffer, "prompt_tokens": n_prompt,
            "max_tokens": max_tokens, "rounds": rounds, "n_threads": n_threads, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"{Path(result['model']).name}: prompt {result['prompt_tokens']} tokens, {result['max_tokens']} generated, "
        f"budget {result['budget']} + buffer {result['buffer']}, {result['n_threads']} threads, "
        f"median of {result['rounds']} rounds",
        "",
        "| configuration | prefill tok/s | decode tok/s | decode / llama-cpp-python | max cells | evicted |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['decode_ratio']:.3f} | "
                     f"{r['max_used_cells']} | {r['evicted_tokens']} |")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """This benchmark's options (on its own parser, or on ``python -m infokv_local bench throughput``)."""
    ap.add_argument("--model", help="GGUF file or registry name (default: the embedded SmolLM2-135M)")
    ap.add_argument("--policies", default="full,streaming,h2o,snapkv,tova,infokv,infokv-rkv")
    ap.add_argument("--budget", type=int, default=DEFAULTS.budget)
    ap.add_argument("--buffer", type=int, default=DEFAULTS.buffer)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--json", help="write the figures here")


def run(args: argparse.Namespace) -> None:
    """Run the benchmark with parsed options."""
    from ..models.registry import resolve_model_path

    result = run_throughput(str(resolve_model_path(args.model)), [p for p in args.policies.split(",") if p],
                            args.budget, args.buffer, args.prompt_tokens, args.max_tokens, args.rounds, args.threads)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m infokv_local bench throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
