#!/usr/bin/env python3
# Run from the repository root: python results/decode-pressure-by-prompt-length.py [LOG] [BUDGET]
# Exploratory (a split chosen after the run, not planned before it): decode-pressure accuracy per policy by the
# question's prompt length (the full cache's prompt tokens: under 96, 96-119, 120 and more), on all questions of
# each policy and on the questions every policy answered; then, of the answers each policy lost against the full
# cache on those common questions, how many replies never write a number of the question that the full cache's
# reply used (from `python -m evaluation diverge LOG --policy P --budget B --json results/diverge-<LOG stem>-P.json`).
import json
import sys
from collections import defaultdict
from pathlib import Path

log = Path(sys.argv[1] if len(sys.argv) > 1 else "results/decode-pressure-qwen2.5-coder-1.5b-b128-q500-799.jsonl")
budget = sys.argv[2] if len(sys.argv) > 2 else "128"
EDGES = ((0, 96), (96, 120), (120, 10**6))

records = [json.loads(x) for x in log.read_text().splitlines() if x.strip().endswith("}")]
full = {r["item_id"]: r for r in records if r["policy"] == "full"}
by_policy: dict[str, dict[str, dict]] = defaultdict(dict)
for r in records:
    if r["budget_spec"] == budget:
        by_policy[r["policy"]][r["item_id"]] = r
common = set(full).intersection(*(set(d) for d in by_policy.values()))
labels = [f"{a}-{b - 1}" if b < 10**6 else f"{a}+" for a, b in EDGES]


def row(outcomes: dict[str, dict], ids: set[str]) -> str:
    cells = []
    for a, b in EDGES:
        ok = [outcomes[i]["correct"] for i in ids if a <= full[i]["prompt_tokens"] < b]
        cells.append(f"{sum(ok)}/{len(ok)} ({100 * sum(ok) / len(ok):.0f}%)" if ok else "-")
    return " | ".join(cells)


order = ["full", *sorted(by_policy, key=lambda p: -sum(r["correct"] for r in by_policy[p].values()) / len(by_policy[p]))]
for title, pick in (("each policy's questions", None), (f"the {len(common)} questions all answered", common)):
    print(f"\naccuracy by prompt tokens, {title} (budget {budget}) | " + " | ".join(labels))
    for p in order:
        outcomes = full if p == "full" else by_policy[p]
        ids = set(outcomes) if pick is None else pick
        print(f"| {p} (n {len(ids)}) | {row(outcomes, ids)} |")

print(f"\nlost against the full cache on the {len(common)} common questions: replies that never write a number of "
      "the question the full cache's reply used")
for p in order[1:]:
    path = Path("results") / f"diverge-{log.stem}-{p}.json"
    if not path.exists():
        print(f"| {p} | (no {path}) |")
        continue
    rows = next(v for v in json.loads(path.read_text()).values() if isinstance(v, list))
    lost = [r for r in rows if r["outcome"] == "lost" and r["item_id"] in common and str(r["budget"]) == budget]
    print(f"| {p} | {sum(1 for r in lost if r['question_numbers_dropped'])} of {len(lost)} |")
