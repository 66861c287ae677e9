"""``python -m evaluation.server_bench``: decode time per token through the server vs the Python API.

The same greedy generation (a raw completion, same model, policy, budget, threads) is timed
through ``InfoKVLlama`` in this process and through ``POST /v1/completions`` (streamed, read with
httpx) on a server started as a subprocess on 127.0.0.1, in adjacent pairs (the order alternating),
``--repeats`` pairs; the overhead is the median of the pairs' ratios, which drift on a shared
machine does not move as it moves the medians of each side.
Decode ms/token is the time from the first to the last text chunk divided by the tokens in
between, as the client sees it (each side's median is printed too). Then a long conversation is parked
(another takes the only slot) and resumed, against the same history sent as a new conversation:
time to the first token and tokens prefilled. Prints the figures and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from infokv_local.settings import DEFAULTS

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the server started as ``proc`` answers ``/health``; SystemExit when it exits or times out."""
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit("the server exited at start")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not start in {timeout:.0f} s")


def _per_token_ms(stamps: list[float]) -> float:
    return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1) * 1e3


def time_api(llm: Any, max_tokens: int) -> tuple[float, int]:
    stamps = []
    for chunk in llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0, stream=True):
        if chunk["choices"][0]["text"]:
            stamps.append(time.perf_counter())
    llm.reset()
    return _per_token_ms(stamps), len(stamps)


def time_server(base: str, max_tokens: int) -> tuple[float, int]:
    import httpx

    stamps = []
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    return _per_token_ms(stamps), len(stamps)


def time_to_first_token(base: str, prompt: str) -> tuple[float, dict[str, Any]]:
    """Client-side ms to the first text chunk of a 4-token completion, and its final usage."""
    import httpx

    t0 = time.perf_counter()
    first = None
    usage: dict[str, Any] = {}
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter()
                usage = chunk.get("usage") or usage
    return ((first or time.perf_counter()) - t0) * 1e3, usage


def resume_vs_prefill(base: str, n_words: int) -> dict[str, Any]:
    """A long conversation parked (another one takes the only slot) and resumed, against the same
    history sent as a new conversation (prefilled from scratch)."""
    words = " ".join(f"Note {i}: the lighthouse keeper counted {i * 7 % 13} ships." for i in range(n_words // 10))
    _, first = time_to_first_token(base, words)
    time_to_first_token(base, "Something else entirely.")  # parks the long conversation
    cont = words + " And then"
    resumed_ms, resumed = time_to_first_token(base, cont)
    time_to_first_token(base, "Something else again.")
    fresh_ms, fresh = time_to_first_token(base, "Fresh. " + cont)
    return {
        "history_tokens": first["prompt_tokens"], "cached_cells": first["kv"]["used_cells"],
        "resumed": {"ttft_ms": resumed_ms, "prefilled_tokens": resumed["prompt_tokens"] - resumed["kv"][
            "reused_tokens"], "restored": resumed["kv"].get("restored")},
        "prefilled": {"ttft_ms": fresh_ms, "prefilled_tokens": fresh["prompt_tokens"] - fresh["kv"]["reused_tokens"]},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.server_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file or registry name (default: the embedded SmolLM2-135M)")
    ap.add_argument("--policy", default=DEFAULTS.policy, help=f"policy on both sides (default: {DEFAULTS.policy})")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--buffer", type=int, default=64)
    ap.add_argument("--threads", type=int, help="CPU threads on both sides (default: the physical cores)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--resume-words", type=int, default=1500,
                    help="words of the conversation parked and resumed (default: 1500)")
    ap.add_argument("--quick", action="store_true", help="64 tokens, 3 repeats, a 600-word conversation to resume")
    ap.add_argument("--json", default="bench-serve.json", help="where to write the figures")
    args = ap.parse_args(argv)
    if args.quick:
        args.max_tokens, args.repeats, args.resume_words = 64, 3, 600


    from infokv_local.api import InfoKVLlama
    from infokv_local.llamacpp.model import Model
    from infokv_local.models.registry import resolve_model_path

    path = resolve_model_path(args.model)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "infokv_local", "serve", "--port", str(port), "--policy", args.policy,
           "--budget", str(args.budget), "--buffer", str(args.buffer), "--slots", "1", "--model", str(path)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    api_ms: list[float] = []
    srv_ms: list[float] = []
    try:
        wait_ready(base, server)
        with Model(path) as model, InfoKVLlama(model, policy=args.policy, budget=args.budget, buffer=args.buffer,
                                                n_threads=args.threads) as llm:
            time_api(llm, 8)  # warm-up, both sides
            time_server(base, 8)
            for i in range(args.repeats):
                # adjacent pairs, the order alternating, so that drift on a shared machine cancels
                for side in (("api", "server") if i % 2 == 0 else ("server", "api")):
                    if side == "api":
                        ms, n_api = time_api(llm, args.max_tokens)
                        api_ms.append(ms)
                    else:
                        ms, n_srv = time_server(base, args.max_tokens)
                        srv_ms.append(ms)
            threads = llm.kv_stats()["n_threads"]
        resume = resume_vs_prefill(base, args.resume_words)
    finally:
        server.terminate()
        server.wait(timeout=60)
    api, srv = statistics.median(api_ms), statistics.median(srv_ms)
    paired = [(b / a - 1) * 100 for a, b in zip(api_ms, srv_ms, strict=True)]
    result = {
        "model": path.name, "policy": args.policy, "budget": args.budget, "buffer": args.buffer,
        "threads": threads, "max_tokens": args.max_tokens, "tokens_api": n_api, "tokens_server": n_srv,
        "repeats": args.repeats, "api_ms_per_token": api_ms, "server_ms_per_token": srv_ms,
        "api_median_ms": api, "server_median_ms": srv, "overhead_pct": statistics.median(paired),
        "paired_overhead_pct": paired, "overhead_of_medians_pct": (srv / api - 1) * 100,
        "resume": resume,
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "platform": platform.platform()},
    }
    print(f"{path.name}, {args.policy} budget {args.budget} + {args.buffer}, {threads} threads, "
          f"{args.max_tokens} tokens x {args.repeats}")
    print(f"{'':10s} {'median ms/token':>16s}  runs")
    print(f"{'python API':10s} {api:16.2f}  {' '.join(f'{x:.2f}' for x in api_ms)}")
    print(f"{'server':10s} {srv:16.2f}  {' '.join(f'{x:.2f}' for x in srv_ms)}")
    print(f"server overhead: {result['overhead_pct']:+.1f}% (median of the {len(paired)} adjacent pairs: "
          f"{' '.join(f'{x:+.1f}' for x in paired)}; of the medians {result['overhead_of_medians_pct']:+.1f}%; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    r, f_ = resume["resumed"], resume["prefilled"]
    print(f"resume a parked conversation of {resume['history_tokens']} tokens ({resume['cached_cells']} cells cached): "
          f"first token after {r['ttft_ms']:.0f} ms, {r['prefilled_tokens']} tokens prefilled (restored: "
          f"{r['restored']}); the same history as a new conversation: {f_['ttft_ms']:.0f} ms, "
          f"{f_['prefilled_tokens']} tokens prefilled")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
