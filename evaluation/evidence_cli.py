"""``python -m evaluation``: task accuracy, decode-time fidelity, needles kept, and the reading of their logs.

``tasks`` and ``fidelity-decode`` run models (their per-item logs resume); ``summary``, ``compare`` and
``diverge`` read those logs. Example: ``python -m evaluation tasks --task decode-pressure --quick``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from infokv_local.bench.arg_types import float_list, int_list
from infokv_local.settings import DEFAULTS

TASK_EXAMPLES = """examples:
  python -m evaluation tasks --task decode-pressure --model qwen2.5-coder-1.5b --budget 128,256 --limit 20
  python -m evaluation tasks --task long-prefill --model qwen2.5-coder-1.5b --lengths 2048 --ratio 0.4,0.2
  python -m evaluation tasks --task long-prefill-block --model qwen2.5-coder-1.5b --lengths 2048 --ratio 0.25
  python -m evaluation tasks --task retrieval --lengths 4096,8192 --ratio 0.25 --limit 10
  python -m evaluation tasks --task multi-step --group 6 --model qwen2.5-coder-1.5b --budget 232,464 --limit 96
  python -m evaluation tasks --task decode-pressure --quick
"""

FID_EXAMPLES = """examples:
  python -m evaluation fidelity-decode --ratio 0.25,0.125 --limit 20 --by-distance
  python -m evaluation fidelity-decode --model qwen2.5-coder-1.5b --budget 128,256,512
  python -m evaluation fidelity-decode --quick
  python -m evaluation fidelity-decode --model qwen2.5-coder-1.5b --group 6 --ratio 0.25,0.125 --by-distance
"""


def _policies(text: str) -> list[str]:
    """Policy specs separated by ';' when any is given, else by ','."""
    return [p.strip() for p in text.split(";" if ";" in text else ",") if p.strip()]


def _budget_specs(args: argparse.Namespace) -> list[str]:
    from infokv_local.bench.fidelity import budget_spec

    return [budget_spec(b, None) for b in args.budget or []] + [budget_spec(None, r) for r in args.ratio or []]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF path or registry name (qwen2.5-coder-1.5b, qwen2.5-coder-0.5b); "
                                   "default: the embedded SmolLM2-135M")
    p.add_argument("--policies", help="comma-separated policy specs (use ';' between specs that carry "
                                      "parameters, e.g. 'infokv:alpha=0.9;snapkv')")
    p.add_argument("--budget", type=int_list, help="budgets in tokens, e.g. 128,256")
    p.add_argument("--ratio", type=float_list, help="budgets as fractions, e.g. 0.25,0.125")
    p.add_argument("--questions", help='JSONL of {"question", "answer"} in GSM8K format (default: GSM8K test)')
    p.add_argument("--limit", type=int, help="number of questions (from --offset)")
    p.add_argument("--offset", type=int, default=0, help="skip this many questions first")
    p.add_argument("--seed", type=int, default=0, help="seed of the constructions (filler, needles)")
    p.add_argument("--max-tokens", type=int,
                   help="generation limit per item (default 400 for CoT, 400 a question for multi-step, 48 retrieval)")
    p.add_argument("--buffer", type=int, default=64, help="cache growth between compressions (default 64)")
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--n-recent", type=int, default=32)
    p.add_argument("--threads", type=int, help="CPU threads (default: the physical cores available)")
    p.add_argument("--out", help="JSON summary path (per-item lines go to the same name with .jsonl)")
    p.add_argument("--quick", action="store_true", help="a few items, two policies, one budget (minutes)")
    p.add_argument("--no-progress", action="store_true")


def _together(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--no-fork", action="store_true",
                   help="every generation or replay reads its prompt (default: a prompt is read once for the "
                        "policies that record the same signals, at the same budget, and copied to the others while "
                        "nothing was evicted from it; the copy holds what their own reading would have)")
    p.add_argument("--parallel", type=int, default=DEFAULTS.parallel,
                   help=f"{what} run at once as sequences of one context, their tokens decoded together "
                        f"(default: {DEFAULTS.parallel}; 1: one after another)")
    p.add_argument("--flash-attn", choices=["auto", "on", "off", "split"], default="auto",
                   help="flash attention of every engine of the run, full cache included (default auto: as "
                        "the log says when resuming; off when a policy needs every query row, as H2O; else the "
                        "engine's verdict for the largest budget; split: on for prompts, off for one-token steps)")


def register(subparsers: Any) -> None:
    """Add ``tasks`` and ``fidelity-decode`` to ``subparsers``."""
    from .task_data import TASKS

    fmt = argparse.RawDescriptionHelpFormatter
    t = subparsers.add_parser(
        "tasks", help="task accuracy under a budget (long-prefill, decode-pressure, retrieval)", formatter_class=fmt,
        description="Greedy generation per policy and budget; accuracy with Wilson 95%% intervals and InfoKV's "
                    "paired difference against each baseline (bootstrap interval, exact McNemar p). Resumable: "
                    "finished generations are appended to OUT.jsonl and skipped on a rerun.",
        epilog=TASK_EXAMPLES)
    t.add_argument("--task", required=True, choices=list(TASKS),
                   help="long-prefill (the question's facts spread through essay filler), long-prefill-block "
                        "(kept together at one point of it), decode-pressure, multi-step (--group questions "
                        "in one reply), retrieval")
    t.add_argument("--lengths", type=int_list, help="context lengths in tokens (long-prefill default 2048; "
                                                  "retrieval 4096,8192)")
    t.add_argument("--group", type=int, default=6,
                   help="multi-step: questions per item, solved one after another in one reply (default 6)")
    t.add_argument("--kinds", default="niah,variable_tracking",
                   help="retrieval items per question id: niah, variable_tracking or both (default)")
    t.add_argument("--prompt-probe", action="store_true",
                   help="the engine's prompt probe: compressions while the prompt is read see its end (the "
                        "question) first; write to another --out than a run without it")
    _together(t, "evicting generations")
    _common(t)
    t.set_defaults(func=run_tasks_cmd)
    f = subparsers.add_parser(
        "fidelity-decode", help="decode-time fidelity over the model's own chain-of-thought", formatter_class=fmt,
        description="The model writes a greedy chain-of-thought per GSM8K question with the full cache (cached); "
                    "each policy is then teacher-forced over prompt + trace, compressing as generation does. "
                    "Mean KL to the full cache, top-1 agreement, NLL change; --by-distance buckets KL by "
                    "tokens since the first compression.",
        epilog=FID_EXAMPLES)
    f.add_argument("--by-distance", action="store_true", help="print and plot KL by distance after the first "
                                                             "compression (0-128, 128-512, 512-2K, 2K+)")
    f.add_argument("--traces", help="trace cache JSONL (default results/traces-MODEL-maxN.jsonl)")
    f.add_argument("--group", type=int, default=1,
                   help="questions per trace, solved one after another in one reply as in tasks --task "
                        "multi-step (default 1: one question per trace)")
    _together(f, "a trace's (policy, budget) replays")
    _common(f)
    f.set_defaults(func=run_fidelity_decode_cmd)


def _load_model(args: argparse.Namespace) -> Any:
    from infokv_local.llamacpp.model import Model
    from infokv_local.models.registry import resolve_model_path

    return Model(resolve_model_path(args.model))


def _model_tag(model: Any) -> str:
    name = Path(str(model.path)).name.lower()
    for tag in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m"):
        if tag in name:
            return tag
    return Path(name).stem


def run_tasks_cmd(args: argparse.Namespace) -> int:
    from infokv_local.llamacpp.flash_attn import setting_of

    from . import tasks as T
    from .task_data import load_questions

    policies = _policies(args.policies) if args.policies else list(T.ALL_POLICIES)
    specs = _budget_specs(args)
    reasoning = args.task in ("decode-pressure", "multi-step")  # budgets in tokens: the reply is what overflows
    if args.quick:
        args.limit = args.limit or (2 * args.group if args.task == "multi-step" else 3)
        policies = _policies(args.policies) if args.policies else ["full", "infokv", "streaming"]
        if not specs:
            specs = ["128"] if reasoning else ["r0.25"]
    if not specs:
        specs = ["128", "256"] if reasoning else ["r0.4", "r0.2"]
    if args.task.startswith("long-prefill"):
        lengths = args.lengths or ([1024] if args.quick else [2048])
    elif args.task == "retrieval":
        lengths = args.lengths or ([2048] if args.quick else [4096, 8192])
    else:
        lengths = []
    if args.task == "retrieval":
        n = args.limit if args.limit is not None else 10
        questions = [{"id": str(i)} for i in range(args.offset, args.offset + n)]
    else:
        questions = load_questions(args.questions, args.limit, args.offset)
    model = _load_model(args)
    try:
        tag = _model_tag(model)
        out = Path(args.out) if args.out else Path("results") / f"tasks-{args.task}-{tag}.json"
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        items = T.build_items(args.task, model, questions, lengths, args.seed, args.max_tokens, kinds, args.group)
        records = T.run_tasks(model, args.task, items, policies, specs, out.with_suffix(".jsonl"),
                              buffer=args.buffer, n_sink=args.n_sink, n_recent=args.n_recent,
                              n_threads=args.threads, progress=not args.no_progress, prompt_probe=args.prompt_probe,
                              parallel=args.parallel, fork=not args.no_fork,
                              flash_attn=setting_of(args.flash_attn))
    finally:
        model.close()
    results = T.summarize(records)
    by_question = T.summarize_questions(records) if args.task == "multi-step" else None
    summary = {"task": args.task, "model": tag, "command": " ".join(sys.argv), "policies": policies,
               "budgets": specs, "lengths": lengths, "buffer": args.buffer, "seed": args.seed,
               "prompt_probe": args.prompt_probe, "parallel": args.parallel, "fork": not args.no_fork,
               "results": results, **({"by_question": by_question, "group": args.group} if by_question else {}),
               "items": records}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(T.format_table(results))
    if by_question:
        print("\nBy question:")
        print(T.format_question_table(by_question))
    print(f"\nwrote {out} ({len(records)} generations; per item: {out.with_suffix('.jsonl')})")
    return 0


def run_fidelity_decode_cmd(args: argparse.Namespace) -> int:
    from infokv_local.bench.kl_ratios import all_kl_ratios, markdown_ratios
    from infokv_local.llamacpp.flash_attn import setting_of

    from . import decode_fidelity as D
    from .task_data import cot_prompt, group_questions, load_questions

    policies = _policies(args.policies) if args.policies else ["infokv", "snapkv", "h2o", "tova", "streaming",
                                                                 "context-shift", "random"]
    specs = _budget_specs(args)
    max_tokens = args.max_tokens or 400 * args.group
    if args.quick:
        args.limit = args.limit or 3 * args.group
        max_tokens = args.max_tokens or 160 * args.group
        specs = specs or ["r0.25"]
    specs = specs or ["r0.25", "r0.125"]
    questions = load_questions(args.questions, args.limit, args.offset)
    prompt_fn: Any = cot_prompt
    if args.group > 1:  # each item's "question" is then the whole multi-step message
        questions, prompt_fn = group_questions(questions, args.group), (lambda message: message)
    model = _load_model(args)
    try:
        tag = _model_tag(model)
        grouped = f"-group{args.group}" if args.group > 1 else ""
        traces_path = Path(args.traces) if args.traces else \
            Path("results") / f"traces-{tag}-max{max_tokens}{grouped}.jsonl"
        traces = D.make_traces(model, questions, traces_path, max_tokens, prompt_fn, n_threads=args.threads,
                               progress=not args.no_progress)
        out = Path(args.out) if args.out else Path("results") / f"fidelity-decode-{tag}.json"
        records = D.run_decode_fidelity(model, traces, policies, specs, out.with_suffix(".jsonl"),
                                        buffer=args.buffer, n_sink=args.n_sink, n_recent=args.n_recent,
                                        n_threads=args.threads, progress=not args.no_progress,
                                        parallel=args.parallel, flash_attn=setting_of(args.flash_attn),
                                        fork=not args.no_fork)
    finally:
        model.close()
    rows = D.summarize(records)
    ratios = all_kl_ratios(records)
    summary = {"model": tag, "command": " ".join(sys.argv), "policies": policies, "budgets": specs,
               "max_tokens": max_tokens, "buffer": args.buffer, "n_questions": len(questions) * args.group,
               "group": args.group, "parallel": args.parallel, "fork": not args.no_fork,
               "flash_attn": sorted({str(r.get("flash_attn")) for r in records}),
               "mean_trace_tokens": sum(len(t["trace_ids"]) for t in traces) / max(len(traces), 1),
               "results": rows, "kl_ratios": ratios}
    out.write_text(json.dumps(summary, indent=1))
    print(D.format_table(rows, by_distance=args.by_distance))
    if ratios:
        print("\nKL over the baselines', paired by trace (95% bootstrap over traces; traces won):")
        print(markdown_ratios(ratios))
    if args.by_distance:
        from .plots import plot_kl_by_distance

        png = out.with_name(out.stem + "-by-distance.png")
        plot_kl_by_distance(rows, png)
        print(f"plot: {png}")
    print(f"\nwrote {out} (per question and policy: {out.with_suffix('.jsonl')})")
    return 0


def _some_of(src: Path, records: list[dict], field: str, asked: str | None, said: str, plural: str) -> list[str] | None:
    """The values of ``field`` a summary is asked to keep (None: all); ``SystemExit`` naming the log's own values
    when no record has any of them."""
    wanted = _policies(asked) if asked else None
    if wanted and not any(r.get(field) in wanted for r in records):
        raise SystemExit(f"{src}: no records {said} {asked} (its {plural}: "
                         f"{', '.join(sorted({str(r.get(field)) for r in records}))})")
    return wanted


def run_summary_cmd(args: argparse.Namespace) -> int:
    """Summarize a (possibly partial) per-item JSONL of ``tasks`` or ``fidelity-decode``: JSON, table, plot."""
    from infokv_local.bench.kl_ratios import all_kl_ratios, markdown_ratios

    from . import decode_fidelity as D
    from . import plots
    from . import tasks as T

    src = Path(args.jsonl)
    records = [json.loads(x) for x in src.read_text().splitlines() if x.strip().endswith("}")]
    budgets = _some_of(src, records, "budget_spec", args.budget, "at budget", "budgets")
    policies = _some_of(src, records, "policy", args.policies, "of", "policies")
    records = T.select_records(records, budgets, args.common, policies)
    out = src.with_suffix(".json") if args.out is None else Path(args.out)
    png = out.with_suffix(".png")
    if records and "kl" in records[0]:
        rows = D.summarize(records)
        ratios = all_kl_ratios(records)
        out.write_text(json.dumps({"source": str(src), "partial": args.partial, "results": rows,
                                   "kl_ratios": ratios}, indent=1))
        print(D.format_table(rows, by_distance=True))
        print(markdown_fidelity(rows))
        print(markdown_ratios(ratios))
        plots.plot_kl_by_distance(rows, out.with_name(out.stem + "-by-distance.png"))
        plots.plot_fidelity_bars(rows, png, title=f"{rows[0]['model']}: decode-time fidelity" if rows else "")
    else:
        references = _policies(args.reference)
        results = T.summarize(records, reference=references)
        by_question = (T.summarize_questions(records, reference=references)
                       if any("sub_correct" in r for r in records) else None)
        out.write_text(json.dumps({"source": str(src), "partial": args.partial, "results": results,
                                   **({"by_question": by_question} if by_question else {}), "items": records},
                                  indent=1))
        print(T.format_table(results))
        for reference in references:
            print(markdown_tasks(results, reference))
        if by_question:  # a multi-step log: its questions one by one
            print(T.format_question_table(by_question))
        if results:
            plots.plot_task_accuracy(results, png, title=f"{results[0]['task']}, {results[0]['model']}")
    print(f"wrote {out} and {png}")
    return 0


def run_compare_cmd(args: argparse.Namespace) -> int:
    """Pair two ``tasks`` logs of the same items (one setting each): per policy and budget, both accuracies
    and a minus b with its intervals. Prints a markdown table; ``--json`` writes the rows."""
    from infokv_local.bench.jsonl import read_log

    from . import tasks as T

    a, b = Path(args.a), Path(args.b)
    for f in (a, b):
        if not f.exists():
            print(f"error: {f} does not exist", file=sys.stderr)
            return 2
    rows = T.compare_logs(list(read_log(a)), list(read_log(b)))
    if not rows:
        print(f"error: {a} and {b} have no (policy, budget, item) in common", file=sys.stderr)
        return 2
    print(f"a = {a}\nb = {b}\n")
    print("| task | length | budget | policy | n | a correct [Wilson 95%] | b correct [Wilson 95%] "
          "| a − b (bootstrap 95%) | a wins / b wins | McNemar p |")
    print("|---|---:|---:|---|---:|---|---|---|---|---:|")
    for r in rows:
        print(f"| {r['task']} | {r['length'] or '—'} | {r['budget']} | {r['policy']} | {r['n']} | "
              f"{r['correct_a']} [{r['ci95_a'][0]:.2f}, {r['ci95_a'][1]:.2f}] | "
              f"{r['correct_b']} [{r['ci95_b'][0]:.2f}, {r['ci95_b'][1]:.2f}] | "
              f"{r['diff']:+.2f} [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}] | {r['wins']} / {r['losses']} | "
              f"{r['mcnemar_p']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"a": str(a), "b": str(b), "command": " ".join(sys.argv),
                                               "results": rows}, indent=1))
        print(f"\nwrote {args.json}")
    if args.plot:
        from .plots import plot_paired_accuracy

        first = rows[0]
        plot_paired_accuracy(rows, args.plot, labels=(args.label_a, args.label_b),
                             title=f"{first['task']}, {Path(str(first['model'])).stem}: {args.label_a} vs "
                                   f"{args.label_b}, the same items")
        print(f"plot: {args.plot}")
    return 0


def run_diverge_cmd(args: argparse.Namespace) -> int:
    """Where a policy's replies leave the reference's on the answers it loses or wins against it, and whether a
    number changed there (:mod:`.divergence`)."""
    from infokv_local.bench.jsonl import read_log

    from . import divergence as D
    from .task_data import load_questions

    src = Path(args.jsonl)
    if not src.exists():
        print(f"error: {src} does not exist", file=sys.stderr)
        return 2
    records = list(read_log(src))
    questions: dict[str, str] = {}
    if any(str(r.get("item_id", "")).startswith("gsm8k-") for r in records):
        by_id = {q["id"]: q["question"] for q in load_questions(args.questions)}
        for r in records:
            m = re.match(r"gsm8k-([^@]+)", str(r.get("item_id", "")))
            if m and m.group(1) in by_id:
                questions[r["item_id"]] = by_id[m.group(1)]
    rows = D.divergences(records, args.policy, against=args.against, budget=args.budget, questions=questions)
    if not rows:
        print(f"{args.policy} and {args.against} agree on every item both answered in {src}")
        return 0
    print(D.markdown(rows))
    tally = D.counts(rows)
    for outcome in ("lost", "won"):
        kinds = dict(tally[outcome])
        dropped = kinds.pop(D.QUESTION_NUMBER_DROPPED, 0)
        listed = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
        print(f"\n{outcome} against {args.against}: {sum(kinds.values())}" + (f" ({listed})" if listed else "")
              + (f"; in {dropped} of them a number of the question that {args.against}'s reply used is never "
                 f"written" if questions else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"source": str(src), "policy": args.policy, "against": args.against,
                                               "budget": args.budget, "counts": tally, "items": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


def markdown_tasks(results: list[dict], reference: str = "infokv") -> str:
    """Markdown: accuracy [Wilson 95%] per policy; ``reference``'s paired difference against each other policy."""
    lines = ["| task | length | budget | policy | n | correct | accuracy | Wilson 95% "
             f"| {reference} − policy (bootstrap 95%) | {reference} wins / losses | McNemar p |",
             "|---|---:|---:|---|---:|---:|---:|---|---|---|---:|"]
    pairs = {(r["task"], r["length"], r["budget"]): r.get("paired", {}) for r in results if r["policy"] == reference}
    for r in results:
        d = None
        if r["policy"] != reference:
            for (t, n, b), pr in pairs.items():
                if (t, n) == (r["task"], r["length"]) and (b == r["budget"] or r["policy"] == "full"):
                    d = pr.get(r["policy"])
                    break
        pd = (f"{d['diff']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] | {d['wins']} / {d['losses']} | "
              f"{d['mcnemar_p']:.2f}") if d else "— | — | —"
        lines.append(f"| {r['task']} | {r['length'] or '—'} | {r['budget']} | {r['policy']} | {r['n']} | "
                     f"{r['correct']} | {r['accuracy']:.2f} | [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {pd} |")
    return "\n".join(lines)


def markdown_fidelity(rows: list[dict]) -> str:
    """Markdown: decode-time fidelity per budget and policy, with the KL by distance buckets."""
    from .decode_fidelity import bucket_labels

    labs = bucket_labels()
    lines = ["| budget | policy | traces | mean KL | p95 KL | top-1 | ΔNLL | tokens | "
             + " | ".join(f"KL {x}" for x in labs) + " |", "|---|---|---:|---:|---:|---:|---:|---:|"
             + "---:|" * len(labs)]
    for r in sorted(rows, key=lambda r: (r["budget"], r["mean_kl"] if r["mean_kl"] is not None else 1e9)):
        if r["mean_kl"] is None:
            continue
        bd = " | ".join(f"{r['by_distance'][x]['mean']:.4f} ({r['by_distance'][x]['n']})" if x in r["by_distance"]
                        else "—" for x in labs)
        lines.append(f"| {r['budget']} | {r['policy']} | {r['n_items']} | {r['mean_kl']:.4f} | {r['p95_kl']:.4f} | "
                     f"{r['top1_agreement']:.3f} | {r['delta_nll']:+.4f} | {r['n_tokens']} | {bd} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m evaluation",
                                 description="The research benchmarks: task accuracy, decode-time fidelity, needles "
                                             "kept, and the reading of their logs.")
    sub = ap.add_subparsers(dest="bench", required=True)
    register(sub)
    from . import needle_retention

    nr = sub.add_parser("needle-retention", help="how much of a needle each policy keeps after reading a long "
                        "prompt, chunked or compressed once", formatter_class=argparse.RawDescriptionHelpFormatter,
                        description=needle_retention.__doc__,
                        epilog="example:\n  python -m evaluation needle-retention --length 2048 --ratio 0.25 "
                               "--items 12 --json needles.json")
    needle_retention.add_arguments(nr)
    nr.set_defaults(func=needle_retention.run)
    sm = sub.add_parser("summary", help="summarize a per-item JSONL (partial runs too): JSON, table, markdown, plot")
    sm.add_argument("jsonl")
    sm.add_argument("--out", help="summary JSON (default: the JSONL's name with .json)")
    sm.add_argument("--partial", action="store_true", help="mark the summary as a partial run")
    sm.add_argument("--budget", help="only these budget specs as the log writes them (e.g. 128, or r0.25), "
                    "separated by ','; the full cache's records are kept as the reference")
    sm.add_argument("--policies", help="only these policies as the log writes them, separated as in --policies of "
                    "tasks; the full cache's records are kept as the reference")
    sm.add_argument("--common", action="store_true",
                    help="only the items every policy and budget left (after --budget and --policies) has "
                         "answered, so all rows share questions")
    sm.add_argument("--reference", default="infokv",
                    help="policies paired against every other policy of a tasks log, separated as in --policies "
                         "(default: infokv)")
    sm.set_defaults(func=run_summary_cmd)
    cp = sub.add_parser("compare", help="pair two tasks logs of the same items run under two settings "
                                        "(e.g. --prompt-probe and not): accuracies, a − b, McNemar")
    cp.add_argument("a", help="per-item JSONL of the first setting")
    cp.add_argument("b", help="per-item JSONL of the second")
    cp.add_argument("--json", help="write the paired rows here")
    cp.add_argument("--plot", help="write a PNG here: both accuracies per policy with their intervals")
    cp.add_argument("--label-a", default="a", help="the first setting's name in the plot (e.g. probed)")
    cp.add_argument("--label-b", default="b", help="the second setting's name in the plot (e.g. chunked)")
    cp.set_defaults(func=run_compare_cmd)
    dv = sub.add_parser("diverge", help="where a policy's replies leave the full cache's on the answers it loses or "
                                        "wins, and whether a number changed there")
    dv.add_argument("jsonl", help="per-item JSONL of `python -m evaluation tasks`")
    dv.add_argument("--policy", required=True, help="the policy spec as written in the log (e.g. infokv)")
    dv.add_argument("--against", default="full", help="the reference policy (default: full)")
    dv.add_argument("--budget", help="only this budget spec (e.g. 256); default: every budget")
    dv.add_argument("--questions", help="the GSM8K-format JSONL the log's questions came from (default: GSM8K test)")
    dv.add_argument("--json", help="write the rows and counts here")
    dv.set_defaults(func=run_diverge_cmd)
    return ap


def main(argv: list[str] | None = None) -> int:
    from infokv_local.errors import InfoKVError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (InfoKVError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
