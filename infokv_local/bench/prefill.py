"""Where a prompt's reading time goes: ``python -m infokv_local bench prefill``.

    python -m infokv_local bench prefill [--model PATH] [--prompt 1024] [--batch 512] [--rounds 3]
                                         [--threads N] [--flash-attn auto|on|off|both] [--json F]

One prompt of ``--prompt`` tokens (essay text) is read in batches of ``--batch`` through the patched
llama.cpp, in steps that each add one part of what InfoKV's statistics cost, so that the difference
between neighbours is that part:

- ``plain``: no statistics, only the last row an output (what stock llama.cpp reads a prompt with);
- ``lm-head``: every row an output (llama.cpp runs the LM head on every row), nothing read from them;
- ``entropy``: plus the top-k entropy of every row (the native kernel over the logits);
- ``layer-dist``: plus the layer-evolution distances;
- ``window``: plus the observation window's attention: InfoKV's prompt statistics (its default, stride 1);
- ``stride-2``, ``stride-4``: the same statistics on every 2nd / 4th row only (``infokv:stride=k``).

Each step has its own context, the steps are interleaved round by round so that machine noise hits them
alike, and each figure is the median over rounds. Prints tokens/s and the ratio to ``plain`` per step,
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from ..llamacpp.threads import default_threads

STEPS: dict[str, dict[str, Any]] = {
    "plain": dict(attn=False, layer_dist=False, entropy_top_k=None, outputs=False, stride=1),
    "lm-head": dict(attn=False, layer_dist=False, entropy_top_k=None, outputs=True, stride=1),
    "entropy": dict(attn=False, layer_dist=False, entropy_top_k=256, outputs=True, stride=1),
    "layer-dist": dict(attn=False, layer_dist=True, entropy_top_k=256, outputs=True, stride=1),
    "window": dict(attn=True, layer_dist=True, entropy_top_k=256, outputs=True, stride=1),
    "stride-2": dict(attn=True, layer_dist=True, entropy_top_k=256, outputs=True, stride=2),
    "stride-4": dict(attn=True, layer_dist=True, entropy_top_k=256, outputs=True, stride=4),
}


def measure(model_path: str, n_prompt: int, batch: int, rounds: int, threads: int,
            flash: tuple[bool, ...]) -> list[dict[str, Any]]:
    """Tokens/s of every step at every flash-attention setting, rounds interleaved."""
    from ..llamacpp.context import StatsContext
    from ..llamacpp.model import Model
    from .speed import _prompt_tokens

    rows: list[dict[str, Any]] = []
    with Model(model_path) as model:
        tokens = _prompt_tokens(model.tokenize, n_prompt)
        contexts = {}
        for fa in flash:
            for name, step in STEPS.items():
                contexts[(name, fa)] = StatsContext(
                    model, n_ctx=n_prompt + 8, n_batch=batch, attn=step["attn"], n_last_rows=32,
                    layer_dist=step["layer_dist"], entropy_top_k=step["entropy_top_k"], n_threads=threads,
                    flash_attn=fa, attn_all_rows=False)
        speeds: dict[tuple[str, bool], list[float]] = {k: [] for k in contexts}
        try:
            for _ in range(rounds):
                for (name, fa), ctx in contexts.items():
                    step = STEPS[name]
                    ctx.clear()
                    t0 = time.perf_counter()
                    for s in range(0, n_prompt, batch):
                        ctx.decode(tokens[s : s + batch], s, all_outputs=step["outputs"], stride=step["stride"])
                    speeds[(name, fa)].append(n_prompt / (time.perf_counter() - t0))
        finally:
            for ctx in contexts.values():
                ctx.close()
    for fa in flash:
        plain = statistics.median(speeds[("plain", fa)])
        for name in STEPS:
            tok_s = statistics.median(speeds[(name, fa)])
            rows.append({"step": name, "flash_attn": fa, "tok_s": tok_s, "ratio_to_plain": tok_s / plain,
                         "rounds": speeds[(name, fa)]})
    return rows


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", help="GGUF file or registry model name (default: the embedded SmolLM2-135M)")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens (default: 1024)")
    ap.add_argument("--batch", type=int, default=512, help="tokens per llama_decode (default: 512, the engine's)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--flash-attn", choices=["auto", "on", "off", "both"], default="both",
                    help="auto: the engine's verdict for this model and machine at the default budget (default: both)")
    ap.add_argument("--json", help="write the figures here")


def run(args: argparse.Namespace) -> int:
    from ..models.registry import resolve_model_path

    path = str(resolve_model_path(args.model))
    if args.flash_attn == "auto":
        from ..engine.sizing import DEFAULT_SIGNAL_STRIDE
        from ..llamacpp.flash_attn import choose, engine_workload
        from ..llamacpp.model import Model
        from ..settings import DEFAULTS

        with Model(path) as model:
            work = engine_workload(args.threads, DEFAULTS.budget + DEFAULTS.buffer, stride=DEFAULT_SIGNAL_STRIDE)
            flash: tuple[bool, ...] = (choose(model, work).setting in ("on", "split"),)  # split reads prompts on
    else:
        flash = {"on": (True,), "off": (False,), "both": (True, False)}[args.flash_attn]
    rows = measure(path, args.prompt, args.batch, args.rounds, args.threads, flash)
    print(f"{Path(path).name}: a {args.prompt}-token prompt in batches of {args.batch}, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'step':12s}{'FA':>4s}{'tok/s':>9s}{'x plain':>9s}")
    for r in rows:
        print(f"{r['step']:12s}{'on' if r['flash_attn'] else 'off':>4s}{r['tok_s']:>9.0f}{r['ratio_to_plain']:>9.3f}")
    if args.json:
        from .speed import machine

        Path(args.json).write_text(json.dumps({"model": path, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                               "prompt_tokens": args.prompt, "batch": args.batch,
                                               "threads": args.threads, "rounds": args.rounds, "rows": rows},
                                              indent=1))
        print(f"wrote {args.json}")
    return 0
