"""Needle retention: does a policy still hold the needle after reading a long prompt under a budget?

The items are the retrieval task's needle-in-a-haystack prompts (:func:`.task_data.niah_item`, RULER's
construction: a 7-digit value for a two-word key at a random depth of the essays, the question at the end).
Each policy reads a prompt (raw text, no chat template) under a budget given as a fraction of it, then one
more token, where generation would start. What is left of the needle then bounds what any answer can be:
``value_kept`` counts the items where every token of the value is still cached, ``sentence_share`` is the
mean share of the needle sentence's tokens kept.

Three ways of reading the prompt (``modes``):

- ``chunked``: the engine's way: it compresses whenever budget + buffer cells are full, so the early
  haystack is evicted before the question, at the end, has been read: the choice is query-agnostic;
- ``probe``: chunked, with the engine's ``prompt_probe``: before each compression the prompt's end (the
  question) is read ahead and its attention is the observation window, inside the same budget + buffer;
- ``once``: the whole prompt is read first (the buffer is the prompt minus the budget), and compressed once
  when the next token comes, with the question in the observation window, as SnapKV's paper compresses
  (Li et al., 2024, arXiv 2404.14469). Peak memory is then the whole prompt's; that compression makes room
  for one token, but its observation window is the prompt's end, so InfoKV scores it with the prompt's mix
  (``decode_on="window"``; ``decode_on="step"`` gives it the generation-step mix, ``decode_mix``).

With a log (the CLI's ``--json`` name with ``.jsonl``) every finished read is appended to it, and a rerun with
the same settings measures only what is missing, so a killed run resumes.

No generation here: the task benchmark (``python -m evaluation tasks --task retrieval``) measures the answers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from infokv_local.bench.jsonl import read_log, require_same_settings
from infokv_local.policies import make_policy

from . import task_data

if TYPE_CHECKING:
    from infokv_local.llamacpp.model import Model

MODES = ("chunked", "probe", "once")


def needle_span(model: Model, prompt: str, value: str) -> tuple[range, range]:
    """Token indices of the needle sentence and of its value in ``model.tokenize(prompt)``."""
    start = prompt.index("One of the special magic numbers")
    v0 = prompt.index(value, start)
    v1 = v0 + len(value)

    def n(text: str) -> int:
        return len(model.tokenize(text))

    return range(n(prompt[:start]), n(prompt[:v1])), range(n(prompt[:v0]), n(prompt[:v1]))


def kept_after_reading(model: Model, tokens: list[int], policy: str, budget: int, mode: str, buffer: int,
                       n_threads: int | None) -> set[int]:
    """Indices of ``tokens`` still cached after ``policy`` read them (and one more token) in ``mode``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    buf = max(len(tokens) - budget, 1) if mode == "once" else buffer
    from infokv_local.engine import Engine

    with Engine(model, policy, budget=budget, buffer=buf, n_threads=n_threads, prompt_probe=mode == "probe") as eng:
        eng.prefill(tokens)
        eng.prefill([tokens[-1]])  # where the first generated token would go
        return set(eng.cached_token_indices().tolist())


def _logged_reads(log: Path | None, config: dict) -> dict[tuple[int, str, str], dict]:
    """Finished reads in ``log`` by (seed, policy, mode); ``ValueError`` when the log was made with other
    settings (a rerun would mix them)."""
    if log is None:
        return {}
    done = {}
    for r in read_log(log):
        require_same_settings(log, r, config)
        done[(r["seed"], r["policy"], r["mode"])] = r
    return done


def run_needle_retention(model: Model, length: int, ratio: float, seeds: list[int], policies: list[str],
                         modes: tuple[str, ...] = MODES, buffer: int = 64, n_threads: int | None = None,
                         progress: bool = True, log: str | Path | None = None) -> dict:
    """Per (policy, mode): items, items whose value is kept whole, mean share of the needle sentence kept;
    per item: seed, depth, prompt tokens and what was kept. Reads already in ``log`` are taken from it, new
    ones appended."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1) (got {ratio})")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r}; choose one of {', '.join(MODES)}")
    policies = [p for p in policies if make_policy(p).evicts]

    def count(text: str) -> int:
        return len(model.tokenize(text, add_special=False, parse_special=False))

    log_path = Path(log) if log is not None else None
    config = {"model": Path(str(model.path)).name, "length": length, "ratio": ratio, "buffer": buffer}
    done = _logged_reads(log_path, config)
    items: list[dict[str, Any]] = []
    todo = [(s, p, m) for s in seeds for p in policies for m in modes if (s, p, m) not in done]
    bar = tqdm(total=len(todo), desc="needles", unit="read", disable=not progress)
    for seed in seeds:
        if not any(t[0] == seed for t in todo):
            items.extend(done[(seed, p, m)] for p in policies for m in modes)
            continue
        item = task_data.niah_item(length, count, seed)
        tokens = model.tokenize(item["prompt"])
        sentence, value = needle_span(model, item["prompt"], item["answers"][0])
        budget = int(ratio * len(tokens))
        for pol in policies:
            for mode in modes:
                if (seed, pol, mode) in done:
                    items.append(done[(seed, pol, mode)])
                    continue
                kept = kept_after_reading(model, tokens, pol, budget, mode, buffer, n_threads)
                rec = {**config, "seed": seed, "depth": item["depth"], "n_tokens": len(tokens), "budget": budget,
                       "policy": pol, "mode": mode, "value_tokens": len(value),
                       "value_kept": sum(i in kept for i in value),
                       "sentence_tokens": len(sentence), "sentence_kept": sum(i in kept for i in sentence)}
                items.append(rec)
                if log_path is not None:
                    with log_path.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                bar.update()
    bar.close()
    rows = []
    for pol in policies:
        for mode in modes:
            its = [it for it in items if it["policy"] == pol and it["mode"] == mode]
            rows.append({"policy": pol, "mode": mode, "n": len(its),
                         "value_kept": sum(it["value_kept"] == it["value_tokens"] for it in its),
                         "sentence_share": float(np.mean([it["sentence_kept"] / it["sentence_tokens"]
                                                          for it in its]))})
    return {**config, "seeds": list(seeds), "results": rows, "items": items}


def format_table(result: dict) -> str:
    lines = [f"{result['model']}: needles at {result['length']} tokens, budget {result['ratio']:g} of the prompt, "
             f"{len(result['seeds'])} items",
             f"{'policy':40s}{'mode':>9s}{'value kept':>12s}{'sentence kept':>15s}"]
    for r in sorted(result["results"], key=lambda r: (r["mode"], -r["value_kept"], -r["sentence_share"])):
        lines.append(f"{r['policy']:40s}{r['mode']:>9s}{r['value_kept']:>6d} of {r['n']:<3d}"
                     f"{r['sentence_share']:>14.0%}")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", help="GGUF file or registry name (default: the embedded SmolLM2-135M)")
    ap.add_argument("--policies", default="infokv;infokv-paper;snapkv;h2o;tova;streaming;random",
                    help="policy specs separated by ';' (parameters joined by ',')")
    ap.add_argument("--length", type=int, default=2048, help="prompt length in tokens (default 2048)")
    ap.add_argument("--ratio", type=float, default=0.25, help="budget as a fraction of the prompt (default 0.25)")
    ap.add_argument("--items", type=int, default=12, help="needles (seeds 0..N-1 of the retrieval task's)")
    ap.add_argument("--offset", type=int, default=0,
                    help="first seed (default 0): other needles than a reported run's, e.g. to choose a setting")
    ap.add_argument("--modes", default="chunked,probe,once", help="chunked, probe, once (default: all three)")
    ap.add_argument("--buffer", type=int, default=64, help="cache growth between compressions when chunked")
    ap.add_argument("--threads", type=int, help="CPU threads (default: the physical cores)")
    ap.add_argument("--json", help="write the result here; the per-read log that resumes a run goes beside it, "
                    "with .jsonl")
    ap.add_argument("--quick", action="store_true", help="2 needles at 1,024 tokens (a minute or two)")
    ap.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from infokv_local.models.registry import resolve_model_path

    if args.quick:
        args.items, args.length = min(args.items, 2), min(args.length, 1024)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    policies = [p.strip() for p in args.policies.split(";") if p.strip()]
    from infokv_local.llamacpp.model import Model

    with Model(resolve_model_path(args.model)) as model:
        seeds = list(range(args.offset, args.offset + args.items))
        result = run_needle_retention(model, args.length, args.ratio, seeds, policies, modes,
                                      buffer=args.buffer, n_threads=args.threads, progress=not args.no_progress,
                                      log=Path(args.json).with_suffix(".jsonl") if args.json else None)
    result["command"] = " ".join(sys.argv)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0
