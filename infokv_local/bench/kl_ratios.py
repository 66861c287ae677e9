"""InfoKV's KL to the full cache over each baseline's, paired by item, with bootstrap intervals.

The fidelity benchmarks score every policy of one item (a document, or a question's trace) on the same
predictions: all policies at one budget compress first at the same step. So the ratio of two policies' KL
sums over a sample is the ratio of their mean KLs, and resampling items (percentile bootstrap) gives its
interval without assuming the tokens of one item are independent. Records are the benchmarks' per-item
lines: ``{"model", "budget_spec", "item_id", "policy", "kl": [per-token KL, ...]}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Every policy InfoKV is measured against, StreamingLLM included: on text kept apart from all tuning it has been
# as strong as the attention policies or stronger, so a "best baseline" without it would flatter InfoKV.
BASELINES = ("h2o", "snapkv", "tova", "streaming", "keydiff", "rkv", "context-shift", "random")


def kl_ratios(records: list[dict], policy: str = "infokv", baselines: Sequence[str] = BASELINES,
              n_boot: int = 5000, seed: int = 0) -> list[dict]:
    """Mean KL of ``policy`` over each baseline's (and over the best baseline's), per (model, budget),
    with a 95% percentile bootstrap interval resampling items and ``wins``: on how many items ``policy``
    has the lower KL. The best baseline is the one with the lowest mean KL on the whole sample."""
    sums: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for r in records:
        sums.setdefault((r["model"], r["budget_spec"]), {}).setdefault(r["policy"], {})[r["item_id"]] = float(
            np.sum(r["kl"]))
    out = []
    rng = np.random.default_rng(seed)
    for (model, spec), per in sorted(sums.items()):
        if policy not in per:
            continue
        present = [b for b in baselines if b in per and b != policy]
        ids = sorted(set(per[policy]).intersection(*(per[b] for b in present)))
        if not ids or not present:
            continue
        mine = np.array([per[policy][i] for i in ids])
        base = {b: np.array([per[b][i] for i in ids]) for b in present}
        best = min(present, key=lambda b: base[b].sum())
        idx = rng.integers(0, len(ids), size=(n_boot, len(ids)))
        row: dict[str, Any] = {"model": model, "budget": spec, "policy": policy, "n_items": len(ids),
                               "best_baseline": best}
        for b in [*present, "best"]:
            den = base[best if b == "best" else b]
            if den.sum() <= 0:
                continue
            boot = mine[idx].sum(axis=1) / np.maximum(den[idx].sum(axis=1), 1e-12)
            row[b] = {"ratio": float(mine.sum() / den.sum()),
                      "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
                      "wins": int((mine < den).sum())}
        out.append(row)
    return out


def all_kl_ratios(records: list[dict], baselines: Sequence[str] = BASELINES, n_boot: int = 5000,
                  seed: int = 0) -> list[dict]:
    """:func:`kl_ratios` for every InfoKV variant in ``records`` (``infokv``, ``infokv:...``,
    ``infokv-paper``) against the baselines, and for every variant against plain ``infokv``
    (the row's ``against`` says which comparison it is)."""
    policies = sorted({r["policy"] for r in records})
    variants = [p for p in policies if p.startswith("infokv")]
    rows = []
    for p in variants:
        for row in kl_ratios(records, p, baselines, n_boot, seed):
            rows.append({**row, "against": "baselines"})
    if "infokv" in policies:
        for p in variants:
            if p != "infokv":
                for row in kl_ratios(records, p, ("infokv",), n_boot, seed):
                    rows.append({**row, "against": "infokv"})
    return rows


def markdown_ratios(rows: list[dict], baselines: Sequence[str] | None = None) -> str:
    """Markdown: each policy's KL over each baseline's: ratio [95% interval], items won of all. One column per
    baseline in ``baselines`` (default: those any row was compared with, in :data:`BASELINES`' order)."""
    against_baselines = [r for r in rows if r.get("against", "baselines") == "baselines"]
    if baselines is None:
        baselines = [b for b in BASELINES if any(b in r for r in against_baselines)]

    def cell(r: dict, b: str) -> str:
        d = r.get(b)
        if not d:
            return "—"
        return f"{d['ratio']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}], {d['wins']} of {r['n_items']}"

    lines = ["| budget | policy | items | ÷ best (which) | " + " | ".join(f"÷ {b}" for b in baselines) + " |",
             "|---|---|---:|---|" + "---|" * len(baselines)]
    for r in against_baselines:
        lines.append(f"| {r['budget']} | {r['policy']} | {r['n_items']} | {cell(r, 'best')} ({r['best_baseline']}) | "
                     + " | ".join(cell(r, b) for b in baselines) + " |")
    variants = [r for r in rows if r.get("against") == "infokv"]
    if variants:
        lines += ["", "| budget | policy | items | ÷ infokv |", "|---|---|---:|---|"]
        lines += [f"| {r['budget']} | {r['policy']} | {r['n_items']} | {cell(r, 'infokv')} |" for r in variants]
    return "\n".join(lines)
