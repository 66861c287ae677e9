"""``python -m infokv_local chat``: an interactive chat in the terminal, under a KV budget."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..engine.interrupts import sigint_deferred
from .options import eos_bias, kv_summary, open_llm, sampling_kwargs

COMMANDS = "/reset starts over, /stats shows the cache, /exit (or Ctrl-D) quits; Ctrl-C stops an answer"
AT_PROMPT = "(Ctrl-C stops an answer; /exit or Ctrl-D quits)"


def run_chat(args: argparse.Namespace) -> None:
    sampling = sampling_kwargs(args)
    with open_llm(args) as llm:
        sampling.update(eos_bias(args, llm))
        start: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
        messages = list(start)
        print(f"{llm.model.path.name}: {kv_summary(llm.kv_stats())}\n{COMMANDS}", file=sys.stderr)
        while True:
            try:
                line = input("> " if sys.stdin.isatty() else "")
            except EOFError:
                print(file=sys.stderr)
                return
            except KeyboardInterrupt:
                # as Python's REPL and Ollama do: a Ctrl-C meant for an answer that had just ended must not
                # throw the conversation away
                print(f"\n{AT_PROMPT}", file=sys.stderr)
                continue
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return
            if line == "/reset":
                messages = list(start)
                llm.reset()
                continue
            if line == "/stats":
                print(kv_summary(llm.kv_stats()), file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            reply: list[str] = []
            kv: dict[str, Any] | None = None  # the turn's, from its last chunk (interrupted or not)
            try:
                for chunk in llm.create_chat_completion(messages, stream=True, **sampling):
                    kv = chunk["kv"]
                    piece = chunk["choices"][0]["delta"].get("content", "")
                    reply.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                print("\n[stopped]", file=sys.stderr)
            try:  # the turn is recorded whatever happens; a Ctrl-C now only cuts the summary short
                with sigint_deferred():
                    messages.append({"role": "assistant", "content": "".join(reply)})
                print()
                reused = f"{kv['reused_tokens']} tokens of history reused" if kv else "stopped in the prompt"
                print(f"[{kv_summary(kv or llm.kv_stats())}; {reused}]", file=sys.stderr)
            except KeyboardInterrupt:
                print(file=sys.stderr)
