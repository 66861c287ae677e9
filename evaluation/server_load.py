"""``python -m evaluation.server_load``: impatient clients against a running server, then its books checked.

A server is started with ``--slots N --budget B --buffer F``. ``--clients`` clients (threads) send requests
for ``--seconds``: new conversations (each opening message different), follow-ups of a conversation
they had, and long prompts (a document to answer a question on), streamed or not, greedy, with the
end of generation banned (every reply is ``--reply-tokens`` tokens). About half of them hang up on
purpose: before the response starts (in the queue, while the prompt is read) or in the middle of a
stream, always long before the reply could be complete, so that the client and the server agree on
which requests were cut. Afterwards (the server given a few seconds to settle) it checks:

- nothing is stuck: the queue is empty and every slot idle;
- the caches stayed in their budget (cells in use, and every reply's ``max_used_cells``);
- every completed reply to a new conversation equals its reference: the same request answered afterwards
  by a fresh server, one request at a time;
- ``infokv_cancelled_total`` equals the requests the clients hung up on, and the 499s in
  ``infokv_requests_total`` too; every other request got its answer.

Prints the figures and the checks, writes JSON; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .server_bench import _free_port, wait_ready

TOPICS = ["a lighthouse", "the moon", "bread", "rivers", "chess", "owls", "glass", "trains", "bees", "maps",
          "volcanoes", "violins", "salt", "bridges", "clocks", "whales", "paper", "tea", "kites", "deserts",
          "ice", "copper", "gardens", "comets", "ships", "wool", "caves", "bells", "honey", "forests", "lamps",
          "stones"]
NOTES = 40
DOCUMENT = " ".join(f"Note {i}: the shipment of {i * 7 % 100} crates left the harbour on day {i % 30 + 1}."
                    for i in range(NOTES))


@dataclass
class Outcome:
    """One request as its client saw it."""

    client: int
    kind: str  # "new", "follow-up", "long"
    stream: bool
    plan: str  # "complete", "early" (hang up before the response starts), "mid-stream"
    messages: list[dict[str, str]]
    t: float
    seconds: float = 0.0
    status: int | None = None
    hung_up: bool = False  # the client closed the connection before the response was complete
    text: str | None = None
    kv: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def opening(client: int, n: int) -> list[dict[str, str]]:
    """The ``n``-th opening message of ``client``: each one different."""
    topic = TOPICS[(client * 7 + n) % len(TOPICS)]
    return [{"role": "user", "content": f"Tell me three facts about {topic} (question {client}.{n})."}]


def ask(base: str, messages: list[dict[str, str]], stream: bool, plan: str, out: Outcome, body_extra: dict[str, Any],
        rng: random.Random, reply_tokens: int) -> None:
    """One chat request as ``plan`` says; fills ``out``."""
    import httpx

    body = {"messages": messages, "temperature": 0, "max_tokens": reply_tokens, "stream": stream, **body_extra}
    # an early hang-up comes well before the quickest whole reply (the prompt, then reply_tokens tokens)
    early = rng.uniform(0.0, 0.15) if plan == "early" else None
    t0 = time.monotonic()
    try:
        if not stream:
            timeout = httpx.Timeout(600, read=early) if early is not None else 600
            r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=timeout)
            out.status = r.status_code
            if r.status_code == 200:
                data = r.json()
                out.text, out.kv = data["choices"][0]["message"]["content"], data["usage"]["kv"]
            else:
                out.error = r.text[:300]
            return
        # mid-stream: after a few of the reply's tokens; early, when the response started all the same: after
        # its first token (the short read timeout also holds between chunks)
        cut_after = rng.randint(1, max(reply_tokens // 4, 1)) if plan == "mid-stream" else (1 if early else None)
        timeout = httpx.Timeout(600, read=early) if early is not None else 600
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=timeout) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = r.read().decode()[:300]
                return
            pieces, n, done = [], 0, False
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                    break
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = json.dumps(chunk)[:300]
                    break
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    pieces.append(chunk["choices"][0]["delta"]["content"])
                    n += 1
                if "usage" in chunk and chunk["usage"]:
                    out.kv = chunk["usage"]["kv"]
                if cut_after is not None and n >= cut_after:
                    out.hung_up = True  # the reply has reply_tokens - n tokens to go: far from complete
                    break
            if done:
                out.text = "".join(pieces)
    except httpx.ReadTimeout:
        out.hung_up = True
    except httpx.HTTPError as e:
        out.error = repr(e)
    finally:
        out.seconds = time.monotonic() - t0


def client_loop(i: int, base: str, args: argparse.Namespace, deadline: float, log: list[Outcome],
                eos_bias: dict[str, int]) -> None:
    rng = random.Random(args.seed * 1000 + i)
    history: list[dict[str, str]] | None = None
    n = 0
    while time.monotonic() < deadline:
        roll = rng.random()
        kind = "long" if roll < 0.15 else ("follow-up" if roll < 0.40 and history else "new")
        stream = rng.random() < 0.5
        roll = rng.random()
        plan = "complete" if roll < 0.5 else ("early" if roll < 0.75 or not stream else "mid-stream")
        if kind == "new":
            messages = opening(i, n)
            n += 1
        elif kind == "long":
            messages = [{"role": "user", "content": f"{DOCUMENT}\n\nWhich day did note {rng.randrange(NOTES)} name?"}]
        else:
            messages = [*(history or []), {"role": "user", "content": "Tell me more."}]
        out = Outcome(client=i, kind=kind, stream=stream, plan=plan, messages=messages, t=time.time())
        ask(base, messages, stream, plan, out, {"logit_bias": eos_bias}, rng, args.reply_tokens)
        log.append(out)
        if out.text is not None and kind != "long":
            history = [*messages, {"role": "assistant", "content": out.text}]


def start_server(cmd: list[str], base: str) -> subprocess.Popen:
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_ready(base, server)
    return server


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.server_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file or registry name (default: the embedded SmolLM2-135M)")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--buffer", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="server threads (default: 2)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=300.0, help="how long the clients go on")
    ap.add_argument("--reply-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="serve-load.json")
    args = ap.parse_args(argv)

    import httpx

    from infokv_local.llamacpp.model import Model
    from infokv_local.models.registry import resolve_model_path

    path = resolve_model_path(args.model)
    with Model(path) as m:
        eos_bias = {str(t): -100 for t in m.eog_tokens()}
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "infokv_local", "serve", "--port", str(port), "--model", str(path),
           "--slots", str(args.slots), "--budget", str(args.budget), "--buffer", str(args.buffer),
           "--threads", str(args.threads), "--queue", str(args.clients)]
    log: list[Outcome] = []
    server = start_server(cmd, base)
    try:
        t0 = time.monotonic()
        deadline = t0 + args.seconds
        threads = [threading.Thread(target=client_loop, args=(i, base, args, deadline, log, eos_bias))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        settle = time.monotonic()
        while time.monotonic() - settle < 30:  # the last hang-ups are noticed within milliseconds
            health = httpx.get(f"{base}/health", timeout=30).json()
            if health["queue"] == 0 and health["slots_idle"] == args.slots:
                break
            time.sleep(0.1)
        settled_s = time.monotonic() - settle
        view = httpx.get(f"{base}/v1/kv", timeout=30).json()
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
    finally:
        stop_server(server)
    fresh = [o for o in log if not o.hung_up and o.kind == "new" and o.text is not None]
    references: list[str | None] = []
    server = start_server(cmd, base)  # the references: each request alone, in a fresh server
    try:
        rng = random.Random(args.seed)
        for o in fresh:
            ref = Outcome(client=-1, kind="new", stream=False, plan="complete", messages=o.messages, t=time.time())
            ask(base, o.messages, False, "complete", ref, {"logit_bias": eos_bias}, rng, args.reply_tokens)
            references.append(ref.text)
    finally:
        stop_server(server)

    def counter(name: str) -> float:
        found = re.search(rf"^{name} (\S+)", metrics, re.M)
        return float(found.group(1)) if found else 0.0

    status_499 = sum(float(v) for v in re.findall(r'^infokv_requests_total\{[^}]*status="499"\} (\S+)', metrics, re.M))
    capacity = args.budget + args.buffer
    hung_up = [o for o in log if o.hung_up]
    answered = [o for o in log if not o.hung_up]
    mismatched = [o for o, ref in zip(fresh, references, strict=True) if o.text != ref]
    failed = [o for o in answered if o.status != 200 or o.text is None]
    checks = {
        "queue empty": view["queue"] == 0,
        "every slot idle": all(s["state"] == "idle" for s in view["slots"]),
        "cells within the budget": view["cells_used"] <= view["cells_limit"]
        and all(o.kv.get("max_used_cells", 0) <= capacity for o in log),
        "fresh replies equal their references": not mismatched,
        "cancelled = hung up": counter("infokv_cancelled_total") == len(hung_up),
        "499s = hung up": status_499 == len(hung_up),
        "every other request answered": not failed,
    }
    result = {
        "model": path.name, "slots": args.slots, "budget": args.budget, "buffer": args.buffer,
        "threads": args.threads, "clients": args.clients, "seconds": elapsed, "reply_tokens": args.reply_tokens,
        "requests": len(log), "hung_up": len(hung_up), "answered": len(answered), "failed": len(failed),
        "by_plan": {p: sum(o.plan == p for o in log) for p in ("complete", "early", "mid-stream")},
        "hung_up_by_plan": {p: sum(o.plan == p for o in hung_up) for p in ("early", "mid-stream")},
        "hung_up_before_response": sum(o.status is None for o in hung_up),
        "by_kind": {k: sum(o.kind == k for o in log) for k in ("new", "follow-up", "long")},
        "fresh_compared": len(fresh), "fresh_mismatched": len(mismatched),
        "restored": sum(bool(o.kv.get("restored")) for o in answered),
        "cancelled_total": counter("infokv_cancelled_total"), "requests_499": status_499,
        "completion_tokens_total": counter("infokv_completion_tokens_total"),
        "settled_s": settled_s, "max_used_cells": max((o.kv.get("max_used_cells", 0) for o in log), default=0),
        "capacity_per_slot": capacity, "checks": checks,
        "failures": [asdict(o) for o in failed[:20]], "mismatches": [asdict(o) for o in mismatched[:20]],
        "outcomes": [asdict(o) for o in log],
    }
    print(f"{path.name}: {args.clients} clients for {elapsed:.0f} s on {args.slots} slots x ({args.budget} + "
          f"{args.buffer}) cells, {args.threads} threads: {len(log)} requests, {len(hung_up)} hung up on purpose "
          f"({result['hung_up_before_response']} before their response started), {len(answered)} answered, "
          f"{int(result['completion_tokens_total'])} tokens generated")
    print(f"settled {settled_s:.2f} s after the last client; cancelled_total {counter('infokv_cancelled_total'):g}, "
          f"499s {status_499:g}; {len(fresh)} fresh replies compared with their references, {len(mismatched)} differ; "
          f"{result['restored']} restored from parking; max cells per reply {result['max_used_cells']} (of {capacity})")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
