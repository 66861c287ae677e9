#!/usr/bin/env python3
# Run from the repository root: python results/batched-full-reference.py [LOG] [REFERENCE_BUDGET] [BUDGET] [OUT]
# The full cache through the batched kernel path (planned in the evidence queue's step 3c before its run; nothing is
# chosen on it). The harness generates `full` one at a time and the evicting policies in batches of 8, and with
# Q4_K weights llama.cpp's kernels for 4 rows or more are not bit-equal to one row's. `random` at a budget no reply
# reaches (REFERENCE_BUDGET, default 471: compression starts above 471 + 64 cells) in batches of 8 is the full
# cache as the policies were computed, but for the tails of the few longest replies (their records say
# `evicted_tokens`). This prints and writes (OUT, default results/batched-full-reference-<LOG stem>.json):
#   1. the batched full cache against the one-at-a-time one: accuracy, wins / losses, McNemar, bootstrap interval,
#      identical texts; on all questions and on the replies that evicted nothing (the noise floor of a comparison
#      with the full cache);
#   2. each policy at BUDGET (default 128) that answered every question both references did, against both.
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.significance import wilson  # noqa: E402
from evaluation.tasks import paired_outcomes  # noqa: E402
from infokv_local.bench.jsonl import read_log  # noqa: E402

log = Path(sys.argv[1] if len(sys.argv) > 1 else "results/decode-pressure-qwen2.5-coder-1.5b-b128-q500-799.jsonl")
reference_budget = sys.argv[2] if len(sys.argv) > 2 else "471"
budget = sys.argv[3] if len(sys.argv) > 3 else "128"
out = Path(sys.argv[4] if len(sys.argv) > 4 else f"results/batched-full-reference-{log.stem}.json")

records = read_log(log)
full = {r["item_id"]: r for r in records if r["policy"] == "full"}
batched = {r["item_id"]: r for r in records
           if r["policy"] == "random" and r["budget_spec"] == reference_budget and not r.get("skipped")}
if not batched:
    raise SystemExit(f"{log}: no `random` records at budget {reference_budget}")
policies: dict[str, dict[str, dict]] = {}
for r in records:
    if r["budget_spec"] == budget and not r.get("skipped"):
        policies.setdefault(r["policy"], {})[r["item_id"]] = r


def pair(a: dict[str, dict], b: dict[str, dict], ids: list[str]) -> dict:
    """a − b on ``ids`` (:func:`evaluation.tasks.paired_outcomes`) with both counts of correct answers."""
    xa, xb = ({i: bool(x[i]["correct"]) for i in ids} for x in (a, b))
    return {**paired_outcomes(xa, xb), "a_correct": sum(xa.values()), "b_correct": sum(xb.values())}


def show(name: str, d: dict) -> str:
    return (f"{name:44s} n {d['n']:3d}  {d['a_correct']:3d} vs {d['b_correct']:3d}  {d['diff']:+.3f} "
            f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]  {d['wins']} / {d['losses']}  p {d['mcnemar_p']:.3f}")


both = sorted(set(full) & set(batched))
untouched = [i for i in both if not batched[i]["evicted_tokens"]]
k = sum(bool(batched[i]["correct"]) for i in both)
floor = {"n": len(both), "batched_correct": k, "batched_ci95": list(wilson(k, len(both))),
         "identical_texts": sum(full[i]["text"] == batched[i]["text"] for i in both),
         "replies_that_evicted": len(both) - len(untouched),
         "max_used_cells": max(batched[i]["max_used_cells"] for i in both),
         "batched_minus_full": pair(batched, full, both),
         "batched_minus_full_no_eviction": pair(batched, full, untouched)}
print(f"{log}: the full cache in batches of 8 (random at {reference_budget}) against one at a time")
print(f"  {len(both)} questions, identical texts {floor['identical_texts']}, replies that evicted "
      f"{floor['replies_that_evicted']} (max cells {floor['max_used_cells']})")
print("  " + show("batched − one at a time", floor["batched_minus_full"]))
print("  " + show("batched − one at a time, nothing evicted", floor["batched_minus_full_no_eviction"]))

partial = {p: len(set(both) & set(d)) for p, d in policies.items() if not set(both) <= set(d)}
policies = {p: d for p, d in policies.items() if p not in partial}
rows = []
print(f"\nbudget {budget}, the {len(both)} questions both references answered"
      + "".join(f"; {p} left out (answered {n} of them)" for p, n in sorted(partial.items())))
print(f"  {'policy':14s} correct  − full (one at a time) [95%], w / l, p   − full (batched) [95%], w / l, p")
for p, outcomes in sorted(policies.items(), key=lambda kv: -sum(kv[1][i]["correct"] for i in both)):
    a, b = pair(outcomes, full, both), pair(outcomes, batched, both)
    rows.append({"policy": p, "budget": budget, "minus_full": a, "minus_batched_full": b})
    print(f"  {p:14s} {a['a_correct']:4d}     {a['diff']:+.3f} [{a['ci95'][0]:+.3f}, {a['ci95'][1]:+.3f}], "
          f"{a['wins']} / {a['losses']}, {a['mcnemar_p']:.3f}   {b['diff']:+.3f} [{b['ci95'][0]:+.3f}, "
          f"{b['ci95'][1]:+.3f}], {b['wins']} / {b['losses']}, {b['mcnemar_p']:.3f}")
out.write_text(json.dumps({"source": str(log), "reference_budget": reference_budget, "budget": budget,
                           "questions": len(both), "left_out": partial, "full_vs_batched": floor, "policies": rows},
                          indent=1))
print(f"\nwrote {out}")
