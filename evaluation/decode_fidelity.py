"""Decode-time fidelity: each policy teacher-forced over the model's own chain-of-thought.

1. Traces: for each question the model writes its chain-of-thought with the full cache (greedy),
   through the GGUF's chat template; the token ids are cached as JSONL (one line per question) so
   every policy and budget sees the same trace.
2. Replay: the full cache and every (policy, budget) engine read prompt + trace in lock-step the way
   generation does: the prompt in prefill chunks (the engine's buffer), then the trace one token per
   decode call, so a policy compresses when budget + buffer is reached, exactly as while generating.
   Over the predictions of trace tokens made after the policy's first compression it reports mean KL
   to the full cache (nats), p95 KL, top-1 agreement and the NLL change of the actual trace token.
3. ``by_distance``: the same per-token KL bucketed by how many tokens after the first compression the
   prediction is made (0-128, 128-512, 512-2K, 2K+), the paper's Forward Influence view: does the
   damage of an eviction fade or compound?

Results resume: each finished (question, policy, budget) is one JSONL line with its per-token arrays.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from infokv_local.api import InfoKVLlama
from infokv_local.bench.fidelity import log_softmax
from infokv_local.bench.jsonl import read_log
from infokv_local.bench.speed import machine
from infokv_local.engine import Engine, EngineSnapshot, SharedContext, policy_reading, run_workers
from infokv_local.llamacpp import flash_attn as fa
from infokv_local.llamacpp.model import Model
from infokv_local.policies import Policy, make_policy

from .forks import PromptForks
from .tasks import read_done, run_flash_attn

BUCKETS = (0, 128, 512, 2048)


def bucket_labels(edges: Sequence[int] = BUCKETS) -> list[str]:
    """``["0-128", "128-512", "512-2K", "2K+"]`` for the default edges."""
    def k(x: int) -> str:
        return f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x)
    return [f"{k(a)}-{k(b)}" for a, b in zip(edges[:-1], edges[1:], strict=True)] + [f"{k(edges[-1])}+"]


def bucket_by_distance(distance: Sequence[int], values: Sequence[float],
                       edges: Sequence[int] = BUCKETS) -> dict[str, dict[str, float]]:
    """Mean of ``values`` per distance bucket ``[edges[i], edges[i+1])`` (the last is open);
    negative distances (before the first compression) are left out. Empty buckets are omitted."""
    d = np.asarray(distance, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    out: dict[str, dict[str, float]] = {}
    idx = np.searchsorted(np.asarray(edges), d, side="right") - 1
    for b, label in enumerate(bucket_labels(edges)):
        m = (idx == b) & (d >= 0)
        if m.any():
            out[label] = {"mean": float(v[m].mean()), "n": int(m.sum())}
    return out


# ---- traces --------------------------------------------------------------------------------------

def make_traces(model: Model, questions: list[dict], path: str | Path, max_tokens: int, prompt_fn: Any,
                n_threads: int | None = None, progress: bool = True) -> list[dict]:
    """Greedy full-cache chain-of-thought per question, cached in ``path`` (reused when present).

    Each line: ``{"id", "model", "max_tokens", "prompt_ids", "trace_ids", "text"}``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    have = {t["id"]: t for t in read_log(path)}
    todo = [q for q in questions if q["id"] not in have]
    if todo:
        need = max(len(model.tokenize(prompt_fn(q["question"]))) for q in todo) + max_tokens + 64
        with InfoKVLlama(model, policy="full", n_ctx=need, n_threads=n_threads) as llm, path.open("a") as fh:
            for q in tqdm(todo, desc="traces", unit="q", disable=not progress):
                llm.reset()
                res = llm.create_chat_completion([{"role": "user", "content": prompt_fn(q["question"])}],
                                                 temperature=0.0, max_tokens=max_tokens, seed=0)
                n_prompt = res["usage"]["prompt_tokens"]
                ids = list(llm.engine.tokens)
                t = {"id": q["id"], "model": Path(str(model.path)).name, "max_tokens": max_tokens,
                     "prompt_ids": ids[:n_prompt], "trace_ids": ids[n_prompt:],
                     "text": res["choices"][0]["message"]["content"]}
                fh.write(json.dumps(t) + "\n")
                fh.flush()
                have[q["id"]] = t
    return [have[q["id"]] for q in questions]


# ---- replay --------------------------------------------------------------------------------------

def budget_for(spec: str, n_tokens: int, floor: int) -> int:
    """``"256"`` -> 256 tokens; ``"r0.25"`` -> a quarter of prompt + trace (at least ``floor``)."""
    return max(int(float(spec[1:]) * n_tokens), floor) if spec.startswith("r") else int(spec)


def replay_trace(model: Model, trace: dict, configs: list[tuple[str, str]], buffer: int = 64, n_sink: int = 4,
                 n_recent: int = 32, window: int = 32, n_threads: int | None = None, parallel: int = 1,
                 flash_attn: fa.FlashAttn = None, fork: bool = True) -> dict[tuple[str, str], dict]:
    """Teacher-force prompt + trace through the full cache and each ``(policy spec, budget spec)``.

    Returns per config the per-token arrays over the trace predictions made after its first
    compression: ``kl``, ``agree``, ``nll_full``, ``nll_comp``, ``distance`` (tokens since the first
    compression), and ``budget``, ``first_evict`` (sequence index of the first prediction made
    after a compression; None if it never compressed).

    The full cache reads the trace first, one token per decode as generation does, and its log-probabilities
    are kept (trace tokens x vocabulary, float32). ``parallel`` > 1: the configs then run that many at a time
    as sequences of one context (:class:`~infokv_local.engine.SharedContext`), each on a thread of its own, so
    their trace tokens are decoded together, one ``llama_decode`` per step for all of them; every engine
    still reads, compresses and predicts as it would alone. ``flash_attn``: every engine's setting (None:
    each engine's own choice, the full cache's too). ``fork``: the prompt is read once for the configs with the
    same budget whose policies read it alike, and forked to the others while nothing was evicted from it
    (:mod:`.forks`); each config says ``prompt_forked``.
    """
    prompt, tr = trace["prompt_ids"], trace["trace_ids"]
    n_all = len(prompt) + len(tr)
    floor = n_sink + n_recent + 1
    # step i: feed the sequence up to and including token (n_prompt - 1 + i); its logits predict trace[i]
    steps = [prompt] + [[t] for t in tr[:-1]]
    out: dict[tuple[str, str], dict] = {}
    for pol, spec in configs:
        out[(pol, spec)] = {"budget": budget_for(spec, n_all, floor), "first_evict": None, "kl": [], "agree": [],
                            "nll_full": [], "nll_comp": [], "distance": [], "prompt_forked": False}
    # a budget + buffer that holds the whole sequence never compresses: nothing to compare
    todo = [key for key in out if out[key]["budget"] + buffer < n_all]
    if not todo:
        return out
    with Engine(model, "full", n_batch=buffer, max_context=n_all + 8, n_threads=n_threads, window=window,
                flash_attn=flash_attn) as full:
        reference = [log_softmax(_last_logits(full, toks)[None, :])[0] for toks in steps]

    def engine_args(key: tuple[str, str]) -> dict[str, Any]:
        return dict(policy=make_policy(key[0]), budget=out[key]["budget"], buffer=buffer, n_sink=n_sink,
                    n_recent=n_recent, window=window, n_threads=n_threads, flash_attn=flash_attn)

    forks = None
    if fork:
        forks = PromptForks()
        forks.expect([_fork_key(make_policy(key[0]), out[key]["budget"]) for key in todo])
    if parallel <= 1 or len(todo) == 1:
        for key in todo:
            with Engine(model, **engine_args(key)) as eng:
                _replay(eng, steps, tr, reference, out[key], forks=forks)
        return out
    stop = threading.Event()
    errors: list[BaseException] = []
    capacity = max(out[key]["budget"] for key in todo) + buffer
    with SharedContext.for_policies(model, min(parallel, len(todo)), [p for p, _ in todo], capacity=capacity,
                                    window=window, n_threads=n_threads, flash_attn=flash_attn) as shared:
        def work(_: int, key: tuple[str, str]) -> None:
            try:
                with Engine(model, **engine_args(key), shared=shared) as eng:
                    _replay(eng, steps, tr, reference, out[key], stop, forks)
            except BaseException as e:  # noqa: BLE001 - raised below, once the others have ended
                errors.append(e)
                stop.set()

        run_workers(todo, shared.n_seq, work, stop)
    if errors:
        raise errors[0]
    return out


def _last_logits(eng: Engine, toks: list[int]) -> np.ndarray:
    row = None
    for _, lg in eng.feed(toks, all_logits=True):
        if lg is not None:
            row = lg[-1]
    assert row is not None
    return row


def _fork_key(policy: Policy, budget: int) -> tuple[object, ...]:
    return (policy_reading(policy), budget)


def _replay(eng: Engine, steps: list[list[int]], trace: list[int], reference: list[np.ndarray], o: dict,
            stop: threading.Event | None = None, forks: PromptForks | None = None) -> None:
    """One config's teacher-forced replay against the full cache's log-probabilities, into ``o``. With ``forks``
    the prompt (step 0) may come from another config's reading: its prediction is not scored then either, since
    a prompt is forked only when no compression came before it."""
    pos = 0  # sequence index of the first token of the current step

    def step(i: int, toks: list[int]) -> None:
        nonlocal pos
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt("stopped before the end of the trace")
        n_steps = eng.totals.steps
        row = _last_logits(eng, toks)
        if o["first_evict"] is None:
            start = pos  # sequence index of the first token of the chunk decoded after the compression
            new_steps = list(islice(reversed(eng.totals.history), eng.totals.steps - n_steps))[::-1]
            for st in new_steps:
                if st.evicted:
                    o["first_evict"] = start
                    break
                start += st.n_tokens
        if o["first_evict"] is not None:
            lp_full = reference[i]
            lp = log_softmax(row[None, :])[0]
            p = np.exp(lp_full)
            o["kl"].append(float((p * (lp_full - lp)).sum()))
            o["agree"].append(bool(lp_full.argmax() == lp.argmax()))
            o["nll_full"].append(float(-lp_full[trace[i]]))
            o["nll_comp"].append(float(-lp[trace[i]]))
            o["distance"].append(pos + len(toks) - 1 - o["first_evict"])
        pos += len(toks)

    def read() -> EngineSnapshot | None:
        step(0, steps[0])  # the prompt, in chunks decoded alone
        return eng.snapshot() if o["first_evict"] is None else None

    if forks is None:
        read()
    elif forks.read_or_fork(_fork_key(eng.policy, o["budget"]), read, eng.fork):
        o["prompt_forked"] = True
        pos = len(steps[0])
    with eng.stepping():  # then one trace token per decode, with the other replays' tokens
        for i in range(1, len(steps)):
            step(i, steps[i])


def run_decode_fidelity(model: Model, traces: list[dict], policies: list[str], budget_specs: list[str],
                        out_jsonl: str | Path, buffer: int = 64, n_sink: int = 4, n_recent: int = 32,
                        window: int = 32, n_threads: int | None = None, progress: bool = True,
                        parallel: int = 1, flash_attn: fa.FlashAttn = None, fork: bool = True) -> list[dict]:
    """Replay every trace for every (evicting policy, budget) not yet in ``out_jsonl``; all records back.

    ``parallel``: configs of a trace replayed at once (:func:`replay_trace`); a log holds replays made one way
    only (``together`` in each line): llama.cpp's kernels for a batch of rows may differ in the last bits from
    those for one row (on Qwen2.5-Coder-1.5B Q4_K_M on an AMD EPYC, mean KL per config moved by up to 0.8%),
    so ``ValueError`` when resuming the other way. Every engine of the run, the
    full cache included, uses one flash-attention setting (:func:`~evaluation.tasks.run_flash_attn`:
    as the log says, else as asked, else off with H2O, else the verdict for the largest budget), recorded."""
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    policies = [p for p in policies if make_policy(p).evicts]
    together = parallel > 1  # batched replays run other kernel paths (llama.cpp is not batch-invariant)
    done = read_done(out, {"prompt_probe": False, "together": together})
    model_name = Path(str(model.path)).name
    floor = n_sink + n_recent + 1
    lengths = [len(t["prompt_ids"]) + len(t["trace_ids"]) for t in traces if t["trace_ids"]]
    largest = max((budget_for(s, n, floor) for s in budget_specs for n in lengths), default=floor)
    setting = run_flash_attn(model, policies, largest, buffer, n_threads, flash_attn, done, out)
    cpu = machine()["cpu"]  # llama.cpp's kernels, and so the last bits of every figure, differ by CPU
    with out.open("a") as fh:
        for tr in tqdm(traces, desc="traces replayed", unit="q", disable=not progress):
            todo = [(p, s) for p in policies for s in budget_specs if (tr["id"], p, s) not in done]
            if not todo or not tr["trace_ids"]:
                continue
            res = replay_trace(model, tr, todo, buffer=buffer, n_sink=n_sink, n_recent=n_recent, window=window,
                               n_threads=n_threads, parallel=parallel, flash_attn=setting, fork=fork)
            for (p, s), o in res.items():
                rec = {"item_id": tr["id"], "model": model_name, "policy": p, "budget_spec": s,
                       "n_prompt": len(tr["prompt_ids"]), "n_trace": len(tr["trace_ids"]), "buffer": buffer,
                       "flash_attn": None if setting is None else fa.label(setting), "together": together,
                       "cpu": cpu,
                       **{k: (np.round(v, 6).tolist() if k in ("kl", "nll_full", "nll_comp") else v)
                          for k, v in o.items()}}
                fh.write(json.dumps(rec) + "\n")
                done[(tr["id"], p, s)] = rec
            fh.flush()
    ids = {t["id"] for t in traces}
    return [r for r in done.values() if r["item_id"] in ids and r["policy"] in policies
            and r["budget_spec"] in budget_specs]


def summarize(records: list[dict], edges: Sequence[int] = BUCKETS) -> list[dict]:
    """Pooled figures per (model, policy, budget spec), with the per-distance KL buckets."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["policy"], r["budget_spec"]), []).append(r)
    rows = []
    for (model, pol, spec), recs in sorted(groups.items()):
        kl = np.concatenate([np.asarray(r["kl"], dtype=np.float64) for r in recs])
        n = int(kl.size)
        agree = np.concatenate([np.asarray(r["agree"], dtype=bool) for r in recs]) if n else np.zeros(0, bool)
        dn = (sum(sum(r["nll_comp"]) - sum(r["nll_full"]) for r in recs) / n) if n else None
        dist = np.concatenate([np.asarray(r["distance"], dtype=np.int64) for r in recs]) if n else np.zeros(0, int)
        rows.append({
            "model": model, "policy": pol, "budget": spec, "n_items": len(recs),
            "n_never_compressed": sum(r["first_evict"] is None for r in recs),
            "mean_budget": float(np.mean([r["budget"] for r in recs])),
            "mean_kl": float(kl.mean()) if n else None, "p95_kl": float(np.percentile(kl, 95)) if n else None,
            "top1_agreement": float(agree.mean()) if n else None, "delta_nll": dn, "n_tokens": n,
            "by_distance": bucket_by_distance(dist.tolist(), kl.tolist(), edges) if n else {},
        })
    return rows


def format_table(rows: list[dict], by_distance: bool = False) -> str:
    """Plain-text table sorted by budget then mean KL; with ``by_distance`` the bucket means too."""
    labels = bucket_labels()
    head = (f"{'budget':>7s} {'policy':14s}{'items':>6s}{'mean KL':>10s}{'p95 KL':>9s}{'top-1':>7s}{'ΔNLL':>9s}"
            f"{'tokens':>8s}")
    if by_distance:
        head += "".join(f"{lab:>10s}" for lab in labels)
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["model"], r["budget"], r["mean_kl"] if r["mean_kl"] is not None else 1e9)):
        if r["mean_kl"] is None:
            lines.append(f"{r['budget']:>7s} {r['policy']:14s}{r['n_items']:>6d}  (never compressed)")
            continue
        line = (f"{r['budget']:>7s} {r['policy']:14s}{r['n_items']:>6d}{r['mean_kl']:>10.4f}{r['p95_kl']:>9.4f}"
                f"{r['top1_agreement']:>7.3f}{r['delta_nll']:>+9.4f}{r['n_tokens']:>8d}")
        if by_distance:
            line += "".join(f"{r['by_distance'][lab]['mean']:>10.4f}" if lab in r["by_distance"] else f"{'—':>10s}"
                            for lab in labels)
        lines.append(line)
    return "\n".join(lines)
