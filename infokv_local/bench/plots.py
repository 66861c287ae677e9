"""Matplotlib figures of the evidence benchmarks (written as PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .decode_fidelity import bucket_labels  # noqa: E402

STYLE = {"infokv": ("tab:red", "o"), "snapkv": ("tab:blue", "s"), "h2o": ("tab:green", "^"),
         "tova": ("tab:purple", "D"), "streaming": ("tab:orange", "v"), "context-shift": ("tab:brown", "P"),
         "random": ("tab:gray", "x"), "full": ("black", "*")}


def _style(policy: str) -> tuple[str, str]:
    return STYLE.get(policy.split(":")[0], ("tab:cyan", "."))


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
            ax.errorbar([x], [r["accuracy"]], yerr=[[r["accuracy"] - r["ci95"][0]], [r["ci95"][1] - r["accuracy"]]],
                        fmt=m, color=c, capsize=2, label=p if i == 0 else None)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(budgets))],
                  [f"{float(b[1:]):.1%} of prompt" if b.startswith("r") else f"{b} tokens" for b in budgets])
    ax.set_ylabel("accuracy (Wilson 95% CI)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
