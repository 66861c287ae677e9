"""Fidelity of each policy to the full cache, teacher-forced over the same documents.

For every document the full cache and every policy read the same tokens in the same chunks (one
chunk = the engine's buffer, so policies compress between chunks as they would while decoding).
Over the tokens read after a policy's first eviction it reports, pooled over all documents:

- ``mean_kl`` and ``p95_kl``: KL(full || compressed) of the next-token distributions (nats);
- ``top1_agreement``: how often both predict the same next token;
- ``delta_nll``: mean negative log-likelihood of the actual next token, compressed minus full;
- ``n_tokens``: how many tokens were counted;
- ``kl_ratios``: each InfoKV variant's KL over each baseline's, paired by document, with a
  bootstrap interval over documents and how many documents it wins (:mod:`.kl_ratios`).

With a log (``run_fidelity(..., log=...)``, the CLI's ``--json`` name with ``.jsonl``) every finished
(document, policy, budget) is one line, and a rerun measures only what the log lacks.

Policies are given as names with optional parameters: ``infokv:alpha=0.95,entropy=at``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..engine import Engine
from ..llamacpp.cache_types import check_cache_type
from ..llamacpp.model import Model
from ..policies import make_policy
from .jsonl import read_inputs, read_log, require_same_settings
from .kl_ratios import all_kl_ratios


def read_docs(path: str | Path) -> list[dict]:
    rows = read_inputs(path, lambda d: isinstance(d.get("text"), str), "an object with a string 'text' (and an 'id')")
    docs = [{"id": d.get("id", str(i)), "text": d["text"]} for i, d in rows]
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class Tally:
    kl: list[np.ndarray] = field(default_factory=list)
    agree: int = 0
    nll_full: float = 0.0
    nll_comp: float = 0.0
    n_nll: int = 0
    evict_s: float = 0.0
    score_s: float = 0.0
    decode_s: float = 0.0

    def add(self, lp_full: np.ndarray, lp_comp: np.ndarray, targets: np.ndarray) -> None:
        p_full = np.exp(lp_full)
        self.kl.append((p_full * (lp_full - lp_comp)).sum(axis=-1))
        self.agree += int((lp_full.argmax(-1) == lp_comp.argmax(-1)).sum())
        n = len(targets)
        rows = np.arange(n)
        self.nll_full -= float(lp_full[rows, targets].sum())
        self.nll_comp -= float(lp_comp[rows, targets].sum())
        self.n_nll += n

    def merge(self, other: Tally) -> None:
        self.kl += other.kl
        self.agree += other.agree
        self.nll_full += other.nll_full
        self.nll_comp += other.nll_comp
        self.n_nll += other.n_nll
        self.score_s += other.score_s
        self.evict_s += other.evict_s
        self.decode_s += other.decode_s

    def to_record(self) -> dict:
        """What a per-document log line keeps (KL per token to 6 decimals)."""
        kl = np.concatenate(self.kl) if self.kl else np.zeros(0)
        return {"kl": np.round(kl, 6).tolist(), "agree": self.agree, "nll_full": self.nll_full,
                "nll_comp": self.nll_comp, "n_nll": self.n_nll, "evict_s": self.evict_s, "score_s": self.score_s,
                "decode_s": self.decode_s}

    @classmethod
    def from_record(cls, rec: dict) -> Tally:
        kl = np.asarray(rec["kl"], dtype=np.float64)
        return cls(kl=[kl] if kl.size else [], agree=rec["agree"], nll_full=rec["nll_full"],
                   nll_comp=rec["nll_comp"], n_nll=rec["n_nll"], evict_s=rec["evict_s"], score_s=rec["score_s"],
                   decode_s=rec["decode_s"])

    def summary(self) -> dict:
        kl = np.concatenate(self.kl) if self.kl else np.zeros(0)
        n = int(kl.size)
        return {
            "mean_kl": float(kl.mean()) if n else None,
            "p95_kl": float(np.percentile(kl, 95)) if n else None,
            "top1_agreement": self.agree / n if n else None,
            "delta_nll": (self.nll_comp - self.nll_full) / self.n_nll if self.n_nll else None,
            "n_tokens": n,
            "score_s": self.score_s,
            "evict_s": self.evict_s,
            "decode_s": self.decode_s,
        }


def budget_spec(budget: int | None, ratio: float | None) -> str:
    """The key of a budget in the per-document logs: ``"128"`` (tokens) or ``"r0.25"`` (a fraction)."""
    return str(budget) if budget is not None else f"r{float(ratio or 0):g}"


def _doc_records(log: Path | None, config: dict, spec: str) -> dict[tuple[str, str], dict]:
    """Finished (document, policy) records of ``spec`` in ``log``; ``ValueError`` when the log holds this
    budget measured with other settings (a rerun would mix them)."""
    if log is None:
        return {}
    done = {}
    for r in read_log(log):
        if r.get("budget_spec") != spec:
            continue
        require_same_settings(log, r, config, f"budget {spec} was ")
        done[(r["item_id"], r["policy"])] = r
    return done


def run_fidelity(model: Model, docs: Iterable[dict], policy_specs: list[str], budget: int | None = None,
                 ratio: float | None = None, buffer: int = 64, n_sink: int = 4, n_recent: int = 32,
                 window: int = 32, max_tokens: int | None = None, progress: bool = True,
                 cache_type: str = "f16", n_threads: int | None = None, log: str | Path | None = None) -> dict:
    """Teacher-forced fidelity of each evicting policy against the full f16 cache. ``cache_type`` (K and V)
    of the evicting policies: with a quantized one, the row ``full@<type>`` is the full cache in that type, its
    KL over every token (quantization and the flash attention it needs, without eviction).

    ``log``: a JSONL that gets one line per finished (document, policy) with its per-token KL; a rerun with
    the same log reads what is there and measures only what is missing (a killed run resumes; ``seconds`` is
    then this run's time and ``resumed_records`` the number of (document, policy) records read from the log). The
    result's ``kl_ratios`` are InfoKV's KL over each baseline's, paired by document
    (:mod:`.kl_ratios`)."""
    cache_type = check_cache_type(cache_type, "cache_type")
    quantized_full = f"full@{cache_type}" if cache_type != "f16" else None
    if (budget is None) == (ratio is None):
        raise ValueError("give exactly one of budget or ratio")
    if ratio is not None and not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1) (got {ratio})")
    policies = {spec: make_policy(spec) for spec in policy_specs}
    policies = {k: p for k, p in policies.items() if p.evicts}  # the full cache is the reference
    names = [*policies, *([quantized_full] if quantized_full else [])]
    spec = budget_spec(budget, ratio)
    model_name = Path(str(model.path)).name
    config = {"model": model_name, "cache_type": cache_type, "buffer": buffer, "n_sink": n_sink,
              "n_recent": n_recent, "window": window, "max_tokens": max_tokens}
    log_path = Path(log) if log is not None else None
    done = _doc_records(log_path, config, spec)
    resumed = len(done)
    tallies = {name: Tally() for name in names}
    per_doc, records = [], []
    docs = list(docs)
    t_start = time.perf_counter()
    for doc in tqdm(docs, desc=f"documents ({spec})", unit="doc", disable=not progress):
        toks = model.tokenize(doc["text"])[:max_tokens]
        b = budget if budget is not None else max(int(float(ratio or 0) * len(toks)), n_sink + n_recent + 1)
        todo = [name for name in names if (doc["id"], name) not in done]
        doc_tallies = {name: Tally.from_record(done[(doc["id"], name)]) for name in names if name not in todo}
        if todo:
            fresh = _measure_document(model, toks, {k: v for k, v in policies.items() if k in todo}, b, buffer,
                                      n_sink, n_recent, window, cache_type,
                                      quantized_full if quantized_full in todo else None, n_threads)
            if log_path is not None:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with log_path.open("a") as fh:
                    for name, dt in fresh.items():
                        rec = {"item_id": doc["id"], "policy": name, "budget_spec": spec, **config,
                               "n_doc_tokens": len(toks), "budget": b, **dt.to_record()}
                        fh.write(json.dumps(rec) + "\n")
                        done[(doc["id"], name)] = rec
            doc_tallies.update(fresh)
        for name in names:
            tallies[name].merge(doc_tallies[name])
            records.append({"item_id": doc["id"], "policy": name, "budget_spec": spec, "model": model_name,
                            "kl": np.concatenate(doc_tallies[name].kl) if doc_tallies[name].kl else []})
        per_doc.append({"id": doc["id"], "n_tokens": len(toks), "budget": b,
                        "policies": {name: doc_tallies[name].summary() for name in names}})
    result: dict[str, Any] = {"model": str(model.path)}
    result["budget" if budget is not None else "ratio"] = budget if budget is not None else ratio
    result.update({
        "cache_type": cache_type, "buffer": buffer, "n_sink": n_sink, "n_recent": n_recent, "window": window,
        "max_tokens": max_tokens,
        "n_docs": len(docs), "seconds": time.perf_counter() - t_start, "resumed_records": resumed,
        "policies": {name: t.summary() for name, t in tallies.items()},
        "kl_ratios": all_kl_ratios(records),
        "per_doc": per_doc,
    })
    return result


def _measure_document(model: Model, toks: list[int], policies: dict[str, Any], budget: int, buffer: int,
                      n_sink: int, n_recent: int, window: int, cache_type: str, quantized_full: str | None,
                      n_threads: int | None) -> dict[str, Tally]:
    """The full f16 cache and every policy (and the quantized full cache) read ``toks`` in the same chunks;
    each policy's tally counts the predictions made after its first eviction (the quantized full cache's,
    every prediction)."""
    full = Engine(model, "full", n_batch=buffer, max_context=len(toks) + 8, n_threads=n_threads)
    engines = {spec: Engine(model, p, budget=budget, buffer=buffer, n_sink=n_sink, n_recent=n_recent,
                            window=window, cache_type_k=cache_type, cache_type_v=cache_type, n_threads=n_threads)
               for spec, p in policies.items()}
    if quantized_full:
        engines[quantized_full] = Engine(model, "full", n_batch=buffer, max_context=len(toks) + 8,
                                         cache_type_k=cache_type, cache_type_v=cache_type, n_threads=n_threads)
    doc_tallies = {spec: Tally() for spec in engines}
    try:
        feeds = {spec: eng.feed(toks, all_logits=True) for spec, eng in engines.items()}
        for start, lf in full.feed(toks, all_logits=True):
            if lf is None:
                raise RuntimeError("feed(all_logits=True) gave no logits")
            n = len(lf)
            targets = np.asarray(toks[start + 1 : start + 1 + n])
            lp_full = log_softmax(lf)[: len(targets)]
            for spec, feed in feeds.items():
                s2, lc = next(feed)
                if s2 != start or lc is None:
                    raise RuntimeError(f"the engines' chunks differ ({s2} vs {start}) or gave no logits")
                if (engines[spec].totals.evicted_tokens == 0 and spec != quantized_full) or len(targets) == 0:
                    continue
                doc_tallies[spec].add(lp_full, log_softmax(lc)[: len(targets)], targets)
        for spec, eng in engines.items():
            t = eng.totals
            doc_tallies[spec].score_s = t.score_s
            doc_tallies[spec].evict_s = t.evict_s
            doc_tallies[spec].decode_s = t.decode_s
    finally:
        full.close()
        for eng in engines.values():
            eng.close()
    return doc_tallies


def format_table(result: dict) -> str:
    what = f"budget {result['budget']}" if "budget" in result else f"ratio {result['ratio']}"
    lines = [f"{Path(result['model']).name}: {result['n_docs']} docs, {what}, buffer {result['buffer']}",
             f"{'policy':36s}{'mean KL':>10s}{'p95 KL':>10s}{'top-1':>8s}{'ΔNLL':>9s}{'tokens':>9s}"]
    rows = sorted(result["policies"].items(), key=lambda kv: kv[1]["mean_kl"] if kv[1]["mean_kl"] is not None else 1e9)
    for spec, s in rows:
        if s["n_tokens"] == 0:
            lines.append(f"{spec:36s}{'(never evicted)':>46s}")
            continue
        lines.append(f"{spec:36s}{s['mean_kl']:>10.4f}{s['p95_kl']:>10.4f}{s['top1_agreement']:>8.3f}"
                     f"{s['delta_nll']:>9.4f}{s['n_tokens']:>9d}")
    return "\n".join(lines)


def format_markdown(results: list[dict]) -> str:
    """One markdown table for several runs (e.g. two budgets), policies as rows."""
    heads = [f"budget {r['budget']}" if "budget" in r else f"{r['ratio']:.1%} budget" for r in results]
    lines = ["| policy | " + " | ".join(f"{h}: mean KL / p95 KL / top-1 / ΔNLL" for h in heads) + " |",
             "|---|" + "---:|" * len(results)]
    first = results[0]["policies"]
    for spec in sorted(first, key=lambda k: first[k]["mean_kl"] if first[k]["mean_kl"] is not None else 1e9):
        cells = []
        for r in results:
            s = r["policies"].get(spec)
            cells.append("—" if not s or s["mean_kl"] is None else
                         f"{s['mean_kl']:.4f} / {s['p95_kl']:.4f} / {s['top1_agreement']:.3f} / {s['delta_nll']:+.4f}")
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def long_documents(model: Model, source: str = "essays", min_tokens: int = 2000, n: int | None = None) -> list[dict]:
    """The first ``n`` (all: None) offline documents of ``source`` (see :func:`.documents.source_documents`)
    of at least ``min_tokens`` tokens of ``model``'s tokenizer."""
    from .documents import source_documents

    docs = [d for d in source_documents(source) if len(model.tokenize(d["text"])) >= min_tokens]
    return docs[:n] if n else docs


def make_docs(model: Model, out: str | Path, min_tokens: int = 2000, n: int | None = None,
              source: str = "essays") -> int:
    """Write :func:`long_documents` as JSONL."""
    docs = long_documents(model, source, min_tokens, n)
    with Path(out).open("w") as fh:
        for d in docs:
            fh.write(json.dumps(d) + "\n")
    return len(docs)
