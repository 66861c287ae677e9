"""``python -m infokv_local.server.bench``: decode time per token through the server vs the Python API.

The same greedy generation (a raw completion, same model, policy, budget, threads) is timed
through ``InfoKVLlama`` in this process and through ``POST /v1/completions`` (streamed, read with
httpx) on a server started as a subprocess on 127.0.0.1, alternately, ``--repeats`` times each.
Decode ms/token is the time from the first to the last text chunk divided by the tokens in
between, as the client sees it; the medians are compared. Prints a table and writes JSON.
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

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infokv_local.server.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file or registry name (default: the embedded SmolLM2-135M)")
    ap.add_argument("--policy", default="infokv")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--buffer", type=int, default=64)
    ap.add_argument("--threads", type=int, help="CPU threads on both sides (default: the physical cores)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="64 tokens, 3 repeats")
    ap.add_argument("--json", default="bench-serve.json", help="where to write the figures")
    args = ap.parse_args(argv)
    if args.quick:
        args.max_tokens, args.repeats = 64, 3

    import httpx

    from ..api import InfoKVLlama
    from ..model import Model
    from ..registry_models import resolve_model_path

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
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit("the server exited at start")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in 300 s")
            time.sleep(0.5)
        with Model(path) as model, InfoKVLlama(model, policy=args.policy, budget=args.budget, buffer=args.buffer,
                                                n_threads=args.threads) as llm:
            time_api(llm, 8)  # warm-up, both sides
            time_server(base, 8)
            for _ in range(args.repeats):
                ms, n_api = time_api(llm, args.max_tokens)
                api_ms.append(ms)
                ms, n_srv = time_server(base, args.max_tokens)
                srv_ms.append(ms)
            threads = llm.kv_stats()["n_threads"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    api, srv = statistics.median(api_ms), statistics.median(srv_ms)
    result = {
        "model": path.name, "policy": args.policy, "budget": args.budget, "buffer": args.buffer,
        "threads": threads, "max_tokens": args.max_tokens, "tokens_api": n_api, "tokens_server": n_srv,
        "repeats": args.repeats, "api_ms_per_token": api_ms, "server_ms_per_token": srv_ms,
        "api_median_ms": api, "server_median_ms": srv, "overhead_pct": (srv / api - 1) * 100,
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "platform": platform.platform()},
    }
    print(f"{path.name}, {args.policy} budget {args.budget} + {args.buffer}, {threads} threads, "
          f"{args.max_tokens} tokens x {args.repeats}")
    print(f"{'':10s} {'median ms/token':>16s}  runs")
    print(f"{'python API':10s} {api:16.2f}  {' '.join(f'{x:.2f}' for x in api_ms)}")
    print(f"{'server':10s} {srv:16.2f}  {' '.join(f'{x:.2f}' for x in srv_ms)}")
    print(f"server overhead: {result['overhead_pct']:+.1f}% (load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs)")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
