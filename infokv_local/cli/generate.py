"""``python -m infokv_local generate``: one prompt, streamed to the terminal (or one JSON object)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .options import eos_bias, kv_summary, open_llm, sampling_kwargs


def run_generate(args: argparse.Namespace) -> None:
    sampling = sampling_kwargs(args)
    with open_llm(args) as llm:
        sampling.update(eos_bias(args, llm))
        if args.raw:
            chunks = llm.create_completion(args.prompt, stream=True, **sampling)
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}]
            chunks = llm.create_chat_completion(messages, stream=True, **sampling)
        text: list[str] = []
        last: dict[str, Any] = {}
        for chunk in chunks:
            choice = chunk["choices"][0]
            piece = choice["text"] if args.raw else choice["delta"].get("content", "")
            text.append(piece)
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
            last = chunk
        usage, timings = last["usage"], last["timings"]
        kv = usage.pop("kv")
        if args.json:
            print(json.dumps({"text": "".join(text), "finish_reason": last["choices"][0]["finish_reason"],
                              "model": llm.model_path, "usage": usage, "kv": kv, "timings": timings}))
            return
        print()
        print(f"[{llm.model.path.name}] prompt {usage['prompt_tokens']} tok "
              f"({timings['prompt_per_second']:.0f} tok/s), completion {usage['completion_tokens']} tok "
              f"({timings['predicted_per_second']:.1f} tok/s); {kv_summary(kv)}", file=sys.stderr)
