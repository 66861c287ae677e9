"""``python -m infokv_local``: the command line."""

from __future__ import annotations

import argparse
import sys

from .errors import InfoKVError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m infokv_local",
        description="Long reasoning with local GGUF models inside a fixed KV-cache budget.",
        epilog='example: python -m infokv_local generate "Why is the sky blue?" --max-tokens 64',
    )
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a reply to one prompt, streamed to the terminal",
                       epilog='example: python -m infokv_local generate "Name three prime numbers." --max-tokens 32')
    g.add_argument("prompt")
    g.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--max-tokens", type=int, default=96)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    args = ap.parse_args(argv)

    try:
        if args.command == "generate":
            from .generate import run
            from .model import default_model_path

            if args.max_tokens <= 0:
                ap.error("--max-tokens must be positive")
            if args.temperature < 0:
                ap.error("--temperature must be >= 0")
            run(args.model or str(default_model_path()), args.prompt, args.max_tokens, args.temperature,
                args.seed, args.raw)
    except InfoKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
