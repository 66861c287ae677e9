"""``python -m evaluation.server_soak``: long simultaneous conversations against a running server's memory.

A server is started with ``--slots N --budget B --buffer F``; ``--conversations`` clients (threads, the
official ``openai`` client) each hold one chat of ``--tokens`` generated tokens, in turns of
``--turn-tokens`` ("Go on." after each answer, the whole history sent every turn, as a chat client does;
end-of-generation banned through ``logit_bias`` so every turn has its length). Every ``--every`` seconds
``GET /v1/kv`` and the server's resident memory (``/proc/<pid>/status``) are sampled. At the end one more
conversation takes a slot (parking one of the finished ones), then the parked one continues: restored
without prefill or not. Prints the figures and writes JSON with the whole timeline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .server_bench import _free_port, wait_ready

OPENING = "Tell me a long story about a lighthouse keeper, a storm and a ship."


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def converse(client: Any, model: str, n_tokens: int, turn_tokens: int, eos_bias: dict[str, int], seed: int,
             log: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One conversation of ``n_tokens`` generated tokens; returns its messages."""
    messages = [{"role": "user", "content": OPENING}]
    generated = 0
    while generated < n_tokens:
        want = min(turn_tokens, n_tokens - generated)
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=want, temperature=0.8,
                                           seed=seed + generated, logit_bias=eos_bias)
        kv = r.usage.model_dump()["kv"]
        generated += r.usage.completion_tokens
        log.append({"t": time.time(), "seed": seed, "generated": generated, "prompt_tokens": r.usage.prompt_tokens,
                    "reused_tokens": kv["reused_tokens"], "max_used_cells": kv["max_used_cells"], "slot": kv["slot"]})
        messages += [{"role": "assistant", "content": r.choices[0].message.content or ""},
                     {"role": "user", "content": "Go on."}]
    return messages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.server_soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file or registry name (default: the embedded SmolLM2-135M)")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--buffer", type=int, default=128)
    ap.add_argument("--threads", type=int, help="server threads (default: the physical cores)")
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=20000, help="generated tokens per conversation")
    ap.add_argument("--turn-tokens", type=int, default=2500, help="generated tokens per turn")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("--json", default="serve-soak.json")
    args = ap.parse_args(argv)

    import httpx
    import openai

    from infokv_local.models.registry import resolve_model_path

    path = resolve_model_path(args.model)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "infokv_local", "serve", "--port", str(port), "--model", str(path),
           "--slots", str(args.slots), "--budget", str(args.budget), "--buffer", str(args.buffer),
           "--queue", str(max(16, args.conversations))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    samples: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    done = threading.Event()
    try:
        wait_ready(base, server)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=3600)
        model_id = client.models.list().data[0].id
        from infokv_local.llamacpp.model import Model

        with Model(path) as m:
            eos_bias = {str(t): -100 for t in m.eog_tokens()}

        def sample() -> None:
            while not done.wait(args.every):
                view = httpx.get(f"{base}/v1/kv", timeout=30).json()
                samples.append({"t": time.time(), "used_cells": view["cells_used"], "limit": view["cells_limit"],
                                "rss_bytes": _rss_bytes(server.pid),
                                "generated": sum(t["generated"] for t in _last_per_seed(turns))})

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.time()
        histories: dict[int, list[dict[str, str]]] = {}

        def run(i: int) -> None:
            histories[i] = converse(client, model_id, args.tokens, args.turn_tokens, eos_bias, 1000 * (i + 1), turns)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(args.conversations)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - t0
        done.set()
        sampler.join()
        # park them: as many new conversations as slots take every slot; then the first one continues
        for i in range(args.slots):
            client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": f"Hello {i}!"}],
                                           max_tokens=8, temperature=0)
        back: Any = histories[0]
        t1 = time.perf_counter()
        r = client.chat.completions.create(model=model_id, messages=back, max_tokens=16, temperature=0)
        usage: Any = r.usage
        resumed = {"ttft_s": time.perf_counter() - t1, **{k: usage.model_dump()["kv"][k]
                                                         for k in ("restored", "reused_tokens")},
                   "prompt_tokens": usage.prompt_tokens}
        view = httpx.get(f"{base}/v1/kv", timeout=30).json()
    finally:
        done.set()
        server.terminate()
        server.wait(timeout=60)
    limit = args.slots * (args.budget + args.buffer)
    rss = [s["rss_bytes"] for s in samples]
    warm = [s["rss_bytes"] for s in samples if s["generated"] >= 0.1 * args.tokens * args.conversations]
    result = {
        "model": path.name, "slots": args.slots, "budget": args.budget, "buffer": args.buffer,
        "conversations": args.conversations, "tokens_per_conversation": args.tokens, "turn_tokens": args.turn_tokens,
        "generated_tokens": sum(t["generated"] for t in _last_per_seed(turns)), "seconds": elapsed,
        "cells_limit": limit, "max_used_cells_sampled": max((s["used_cells"] for s in samples), default=0),
        "max_used_cells_per_turn": max((t["max_used_cells"] for t in turns), default=0),
        "rss_first_mib": rss[0] / 2**20 if rss else None, "rss_max_mib": max(rss) / 2**20 if rss else None,
        "rss_growth_after_warmup_pct": (max(warm) / warm[0] - 1) * 100 if warm else None,
        "resumed": resumed, "parked_at_end": view.get("parked"), "samples": samples, "turns": turns,
    }
    print(f"{path.name}: {args.conversations} conversations x {args.tokens} tokens on {args.slots} slots x "
          f"({args.budget} + {args.buffer}) cells, {result['generated_tokens']} tokens in {elapsed:.0f} s")
    print(f"cells in use: at most {result['max_used_cells_sampled']} sampled (limit {limit}); per request at most "
          f"{result['max_used_cells_per_turn']} (limit {args.budget + args.buffer})")
    if rss:
        print(f"server RSS: {result['rss_first_mib']:.0f} MiB first sample, {result['rss_max_mib']:.0f} MiB max, "
              f"{result['rss_growth_after_warmup_pct']:+.2f}% after the first 10% of the tokens")
    print(f"a parked {resumed['prompt_tokens']}-token conversation continued: restored {resumed['restored']}, "
          f"{resumed['reused_tokens']} tokens reused, first answer in {resumed['ttft_s']:.2f} s")
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0


def _last_per_seed(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    last: dict[int, dict[str, Any]] = {}
    for t in list(turns):
        last[t["seed"]] = t
    return list(last.values())


if __name__ == "__main__":
    sys.exit(main())
