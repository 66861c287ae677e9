"""Matplotlib figures of the evidence benchmarks (written as PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .decode_fidelity import bucket_labels  # noqa: E402

STYLE = {"infokv": ("tab:red", "o"), "snapkv": ("tab:blue", "s"), "h2o": ("tab:green", "^"),
         "tova": ("tab:purple", "D"), "streaming": ("tab:orange", "v"), "context-shift": ("tab:brown", "P"),
         "random": ("tab:gray", "x"), "full": ("black", "*"), "infokv-rkv": ("darkred", "h"),
         "rkv": ("tab:cyan", "p"), "keydiff": ("tab:olive", "X"), "infokv-paper": ("salmon", "o")}


def _style(policy: str) -> tuple[str, str]:
    return STYLE.get(policy.split(":")[0], ("tab:pink", "."))


def _error_bar(value: float, interval: tuple[float, float] | list[float]) -> list[list[float]]:
    """Matplotlib's yerr for an interval around a value (rounding can put 10/10's Wilson bound a hair below 1)."""
    return [[max(value - interval[0], 0.0)], [max(interval[1] - value, 0.0)]]


def _budget_text(spec: str) -> str:
    """A tasks budget spec for a reader: "r0.25" -> "25.0% of prompt", "256" -> "256 tokens"."""
    spec = str(spec)
    return f"{float(spec[1:]):.1%} of prompt" if spec.startswith("r") else f"{spec} tokens"


def plot_kl_by_distance(rows: list[dict], path: str | Path) -> Path:
    """Mean KL per distance bucket after the first compression, one line per policy, one panel per budget."""
    budgets = sorted({r["budget"] for r in rows})
    labels = bucket_labels()
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 3.8), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], budgets, strict=True):
        for r in (r for r in rows if r["budget"] == b):
            xs = [i for i, lab in enumerate(labels) if lab in r["by_distance"]]
            if not xs:
                continue
            c, m = _style(r["policy"])
            ax.plot(xs, [r["by_distance"][labels[i]]["mean"] for i in xs], marker=m, color=c, label=r["policy"])
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("tokens after the first compression")
        ax.set_title(f"budget {b[1:] if b.startswith('r') else b}" + (" of prompt+trace" if b.startswith("r") else ""))
        ax.set_yscale("log")
    axes[0][0].set_ylabel("mean KL to full cache (nats)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fidelity_bars(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Mean KL per policy at each budget (grouped bars)."""
    budgets = sorted({r["budget"] for r in rows})
    policies = sorted({r["policy"] for r in rows},
                      key=lambda p: next(r["mean_kl"] or 0 for r in rows if r["policy"] == p))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    w = 0.8 / max(len(policies), 1)
    for j, p in enumerate(policies):
        vals = [next((r["mean_kl"] for r in rows if r["policy"] == p and r["budget"] == b), None) or 0 for b in budgets]
        ax.bar([i + j * w for i in range(len(budgets))], vals, w, label=p, color=_style(p)[0])
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(budgets))], budgets)
    ax.set_ylabel("mean KL to full cache (nats)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_task_accuracy(results: list[dict], path: str | Path, title: str = "") -> Path:
    """Accuracy with Wilson 95% intervals per policy, one group per budget (the full cache as a band)."""
    budgets = [b for b in dict.fromkeys(r["budget"] for r in results) if b != "full"]
    policies = [p for p in dict.fromkeys(r["policy"] for r in results) if p != "full"]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    full = next((r for r in results if r["policy"] == "full"), None)
    if full:
        ax.axhspan(full["ci95"][0], full["ci95"][1], color="black", alpha=0.08)
        ax.axhline(full["accuracy"], color="black", lw=1, label=f"full ({full['correct']}/{full['n']})")
    w = 0.8 / max(len(policies), 1)
    for j, p in enumerate(policies):
        for i, b in enumerate(budgets):
            r = next((r for r in results if r["policy"] == p and r["budget"] == b), None)
            if r is None:
                continue
            x = i + j * w
            c, m = _style(p)
            ax.errorbar([x], [r["accuracy"]], yerr=_error_bar(r["accuracy"], r["ci95"]),
                        fmt=m, color=c, capsize=2, label=p if i == 0 else None)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(budgets))], [_budget_text(b) for b in budgets])
    ax.set_ylabel("accuracy (Wilson 95% CI)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_paired_accuracy(rows: list[dict], path: str | Path, labels: tuple[str, str] = ("a", "b"),
                         title: str = "") -> Path:
    """Two settings of the same items (rows of ``tasks.compare_logs``): per policy, setting a's (filled) and
    setting b's (open) accuracy side by side with Wilson 95% intervals, one panel per (length, budget), the
    McNemar p above each pair; the full cache's accuracy in setting a as a band."""
    full = {r["length"]: r for r in rows if r["policy"] == "full"}
    rest = [r for r in rows if r["policy"] != "full"] or rows
    groups = list(dict.fromkeys((r["length"], r["budget"]) for r in rest))
    per_panel = max(len(rest) / len(groups), 1)
    fig, axes = plt.subplots(1, len(groups), figsize=((1.3 * per_panel + 2) * len(groups), 4.2), squeeze=False,
                             sharey=True)
    for ax, (length, budget) in zip(axes[0], groups, strict=True):
        sub = [r for r in rest if (r["length"], r["budget"]) == (length, budget)]
        f = full.get(length)
        if f is not None and f is not sub[0]:
            acc = f["correct_a"] / f["n"]
            ax.axhspan(f["ci95_a"][0], f["ci95_a"][1], color="black", alpha=0.08)
            ax.axhline(acc, color="black", lw=1, label=f"full cache ({f['correct_a']}/{f['n']})")
        for i, r in enumerate(sub):
            c, m = _style(r["policy"])
            for k, (side, face) in enumerate((("a", c), ("b", "white"))):
                acc = r[f"correct_{side}"] / r["n"]
                lo, hi = r[f"ci95_{side}"]
                ax.errorbar([i + (k - 0.5) * 0.3], [acc], yerr=_error_bar(acc, (lo, hi)), fmt=m, color=c,
                            markerfacecolor=face, capsize=3, markersize=8)
            if r["policy"] != "full":
                ax.text(i, 1.06, f"McNemar p={r['mcnemar_p']:.3f}", ha="center", fontsize=7)
        ax.set_xticks(range(len(sub)), [f"{r['policy']}\n(n={r['n']})" for r in sub], fontsize=8)
        ax.set_xlim(-0.6, len(sub) - 0.4)
        ax.set_title((f"{length}-token prompts, " if length else "") + f"budget {_budget_text(budget)}", fontsize=9)
    axes[0][0].set_ylabel("accuracy (Wilson 95% CI)")
    axes[0][0].set_ylim(-0.02, 1.12)
    for ax in axes[0]:
        handles = [plt.Line2D([], [], marker="o", color="black", linestyle="", label=labels[0]),
                   plt.Line2D([], [], marker="o", color="black", markerfacecolor="white", linestyle="",
                              label=labels[1])]
        ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize=7, loc="center left",
                  bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
