"""``python -m evaluation.server_throughput``: aggregate tokens/s of N clients at once against one alone.

A server is started with ``--slots N`` (ours: ``serve --slots N --budget B --buffer F``; with
``--llama-server PATH`` also llama.cpp's own ``llama-server --parallel N`` with the same cells per slot,
threads and model, both started before the first round). Each round sends one request alone, then ``N`` requests at once
(each a new conversation with its own opening, so each takes a slot of its own), all greedy with the end
of generation banned, so every reply is ``--reply-tokens`` tokens. Aggregate tok/s is the replies' tokens
over the wall time from the first request sent to the last answer read (prompts included: what a user
waiting for the answers sees). The scaling of a server is the median over rounds of (N at once) / (one
alone) in the same round. With llama-server the two servers take turns round by round (ours, then
llama-server, then ours again ...), so the machine's drift falls on both alike; our server against
llama-server is the median over rounds of the ratio of their aggregate tok/s in the same round (and of
one client's). Prints the figures and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from infokv_local.settings import DEFAULTS

from .server_bench import _free_port, wait_ready

OPENINGS = ["lighthouses", "the moon", "bread", "rivers", "chess", "owls", "glass", "trains", "bees", "maps",
            "volcanoes", "violins", "salt", "bridges", "clocks", "whales"]


def prompt_of(i: int, round_: int) -> str:
    """A raw completion prompt of its own for request ``i`` of round ``round_``."""
    topic = OPENINGS[(i + 3 * round_) % len(OPENINGS)]
    return f"Question {round_}.{i}: write a long story about {topic}.\n\nStory:"


def one_request(base: str, prompt: str, reply_tokens: int, extra: dict[str, Any]) -> int:
    """Send one greedy completion; the reply's tokens."""
    import httpx

    body = {"prompt": prompt, "max_tokens": reply_tokens, "temperature": 0, "stream": False, **extra}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=900)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


def together(base: str, n: int, round_: int, reply_tokens: int, extra: dict[str, Any]) -> tuple[float, int]:
    """``n`` requests at once: (seconds from the first sent to the last read, tokens in all)."""
    tokens = [0] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            tokens[i] = one_request(base, prompt_of(i, round_), reply_tokens, extra)
        except BaseException as e:  # noqa: BLE001 - raised in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return seconds, sum(tokens)


def one_round(base: str, slots: int, r: int, reply_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Round ``r``: one request alone, then ``slots`` at once."""
    s1, t1 = together(base, 1, 2 * r, reply_tokens, extra)
    sn, tn = together(base, slots, 2 * r + 1, reply_tokens, extra)
    return {"one_tok_s": t1 / s1, "all_tok_s": tn / sn, "ratio": (tn / sn) / (t1 / s1), "one_tokens": t1,
            "all_tokens": tn}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A server's rounds and their medians."""
    return {"rounds": rows, "one_tok_s": statistics.median(x["one_tok_s"] for x in rows),
            "all_tok_s": statistics.median(x["all_tok_s"] for x in rows),
            "ratio": statistics.median(x["ratio"] for x in rows)}


def measure(servers: dict[str, str], slots: int, rounds: int, reply_tokens: int,
            extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One warm-up request per server, then ``rounds`` rounds, the servers (name -> base URL) taking turns
    in each."""
    for base in servers.values():
        one_request(base, prompt_of(99, 99), 8, extra)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    for r in range(rounds):
        for name, base in servers.items():
            row = one_round(base, slots, r, reply_tokens, extra)
            rows[name].append(row)
            print(f"  round {r + 1}, {name}: one client {row['one_tok_s']:.1f} tok/s, {slots} at once "
                  f"{row['all_tok_s']:.1f} tok/s together ({row['ratio']:.2f}x)", flush=True)
    return {name: summary(rs) for name, rs in rows.items()}


def serve(cmd: list[str], base: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(base, proc, timeout=600)
    except BaseException:
        proc.kill()
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def main(argv: list[str] | None = None) -> int:
    from infokv_local.llamacpp.model import Model
    from infokv_local.models.registry import resolve_model_path

    ap = argparse.ArgumentParser(prog="python -m evaluation.server_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file or registry name (default: the embedded SmolLM2-135M)")
    ap.add_argument("--slots", type=int, default=4, help="slots, and requests sent at once (default: 4)")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--buffer", type=int, default=64)
    ap.add_argument("--policy", default=DEFAULTS.policy, help=f"the server's policy (default: {DEFAULTS.policy})")
    ap.add_argument("--threads", type=int, default=2, help="server threads (default: 2)")
    ap.add_argument("--reply-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary, to run the same load against it")
    ap.add_argument("--json", default="serve-throughput.json")
    args = ap.parse_args(argv)
    if args.slots < 2 or args.rounds < 1 or args.reply_tokens < 1:
        ap.error("--slots must be at least 2, --rounds and --reply-tokens positive")

    path = resolve_model_path(args.model)
    with Model(path) as m:
        eos = m.eos_token_id
    ban = {"logit_bias": {str(eos): -100}}
    out: dict[str, Any] = {
        "model": os.path.basename(path), "slots": args.slots, "budget": args.budget, "buffer": args.buffer,
        "policy": args.policy, "threads": args.threads, "reply_tokens": args.reply_tokens, "rounds": args.rounds,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "command": " ".join([sys.executable, "-m", "evaluation.server_throughput", *(argv or sys.argv[1:])])}
    ports = {"ours": _free_port()}
    ours = [sys.executable, "-m", "infokv_local", "serve", "--model", path, "--slots", str(args.slots),
            "--budget", str(args.budget), "--buffer", str(args.buffer), "--policy", args.policy,
            "--threads", str(args.threads), "--port", str(ports["ours"]), "--max-prompt-tokens", "0"]
    print(f"infokv-local serve --slots {args.slots} --budget {args.budget} --buffer {args.buffer} "
          f"--policy {args.policy} --threads {args.threads}; {args.reply_tokens} tokens per reply", flush=True)
    commands = {"ours": ours}
    if args.llama_server:
        cells = args.slots * (args.budget + args.buffer)
        ports["llama_server"] = _free_port()
        while ports["llama_server"] == ports["ours"]:
            ports["llama_server"] = _free_port()
        commands["llama_server"] = [
            args.llama_server, "-m", path, "--parallel", str(args.slots), "-c", str(cells), "--threads",
            str(args.threads), "--threads-batch", str(args.threads), "--port", str(ports["llama_server"]),
            "--host", "127.0.0.1", "--no-warmup", "--context-shift"]
        print(f"llama-server --parallel {args.slots} -c {cells} --threads {args.threads} --context-shift; "
              "the two take turns round by round", flush=True)
    procs: list[subprocess.Popen] = []
    try:
        for name, cmd in commands.items():
            procs.append(serve(cmd, f"http://127.0.0.1:{ports[name]}"))
        out.update(measure({name: f"http://127.0.0.1:{ports[name]}" for name in commands}, args.slots,
                           args.rounds, args.reply_tokens, ban))
    finally:
        for proc in procs:
            stop(proc)
    print(f"ours: one client {out['ours']['one_tok_s']:.1f} tok/s, {args.slots} at once "
          f"{out['ours']['all_tok_s']:.1f} tok/s = {out['ours']['ratio']:.2f}x", flush=True)
    if args.llama_server:
        ls = out["llama_server"]
        pairs = list(zip(out["ours"]["rounds"], ls["rounds"], strict=True))
        out["ours_vs_llama_server"] = statistics.median(a["all_tok_s"] / b["all_tok_s"] for a, b in pairs)
        out["ours_vs_llama_server_one_client"] = statistics.median(a["one_tok_s"] / b["one_tok_s"] for a, b in pairs)
        print(f"llama-server: one client {ls['one_tok_s']:.1f} tok/s, {args.slots} at once {ls['all_tok_s']:.1f} "
              f"tok/s = {ls['ratio']:.2f}x; ours / llama-server in the same round, median: "
              f"{out['ours_vs_llama_server']:.2f}x with {args.slots} at once, "
              f"{out['ours_vs_llama_server_one_client']:.2f}x for one client", flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
