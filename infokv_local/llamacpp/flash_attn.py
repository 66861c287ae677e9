"""Flash attention on or off, chosen by measuring both on this model and machine, once per cache size.

Which is faster depends on the CPU, the model and how many cells each decode step attends over: stock
llama.cpp on SmolLM2-135M decodes 14% faster with flash attention on on a 2-core AMD EPYC, and 2.3x slower on
an Intel Xeon with AVX-512; on the EPYC our engine's request is faster with it on at 320 cells and level at
1,152 (its decode steps slower with it on there, its prompts faster). So where there is a choice (a CPU, and a
policy that does not need the attention of every query row), :func:`choose` times each setting on the engine's
own work and keeps the faster: a request of a 1,024-token prompt and a 512-token reply, the prompt read as the
engine reads prompts (the statistics on, with the default policy's row stride, batches of 512) and decode
steps in a context filled to the engine's size class (:func:`size_class`: its cells rounded up to a multiple
of 256, at most 2,048, so a budget of 256 + 64 is timed at 512 cells, 1,024 + 128 at 1,280) with its
statistics, the observation window in its share of the steps. A third choice, ``split``, reads prompts with it
on and decodes one-token steps with it off (the cache made for off, its V read through a copy by the fused kernel
of a prompt batch: patch 11), for a CPU whose fused kernel is the faster for prompts and the slower for steps.
One verdict per model (its file's size and first and last bytes, whatever its name), CPU, library build,
threads, cache types, statistics and size class: engines in the same class compute the same numbers whatever their
budget (an evicting engine gives the full cache's predictions until its first eviction when both are in one
class); a run that compares engines of different classes (the evaluation harness) passes one setting to all of
them. It is cached in the user cache directory (``$INFOKV_CACHE``, default ``~/.cache/infokv-local/flash-attn.json``):
each context is timed twice, in the order on, off, off, on, and keeps its faster timings, so that a job running beside
the measurement or a drifting machine slows all alike; a few seconds per class for SmolLM2-135M on 2 cores, six
prefills of up to 2,048 tokens for a large model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CacheSettingsError
from ..settings import DEFAULTS
from ..user_cache import cache_dir, read_json, update_json
from . import library as native
from .cache_types import is_quantized
from .context import StatsContext
from .model import Model
from .threads import resolve_threads

MIN_FILL, MAX_FILL = 256, 2048  # the smallest and largest size class (bigger caches are timed at 2,048 cells)
STEPS = 12  # timed decode steps per kind (without and with the window's statistics), after 2 untimed
CACHE_FILE = "flash-attn.json"
_lock = threading.Lock()
SETTINGS = ("on", "off", "split")  # the measured choices
SPLIT = "split"  # flash attention on for prompts, off for one-token decode steps
FlashAttn = bool | str | None  # an engine's flash_attn: True, False, "split", or None (chosen by measurement)


def context_flash_attn(setting: FlashAttn) -> tuple[bool | None, bool | None]:
    """``flash_attn`` and ``prompt_flash_attn`` of a :class:`StatsContext` running ``setting``."""
    return (False, True) if setting == SPLIT else (bool(setting) if setting is not None else None, None)


def setting_of(said: str) -> FlashAttn:
    """The setting an engine's ``flash_attn`` label (:func:`label`) stands for, to give another engine the same."""
    settings: dict[str, FlashAttn] = {"on": True, "off": False, SPLIT: SPLIT}
    return settings.get(said)


def label(setting: FlashAttn) -> str:
    """``"on"``, ``"off"``, ``"split"``, or ``"auto"`` (llama.cpp's choice) for a setting."""
    return "auto" if setting is None else SPLIT if setting == SPLIT else "on" if setting else "off"


@dataclass(frozen=True)
class Choice:
    """The setting (``"on"``, ``"off"``, ``"split"``: on for prompts and off for steps, or ``"auto"``: llama.cpp's)
    and why."""

    setting: str
    reason: str
    ms_per_token: dict[str, float] | None = None  # per decode step of each setting, when it was measured
    prompt_s: dict[str, float] | None = None  # to read the compared prompt, when it was measured


@dataclass(frozen=True)
class Workload:
    """What one decode step of the engine computes, for timing it."""

    capacity: int  # cells of the context (budget + buffer, or the full context)
    n_batch: int
    threads: int
    cache_type_k: str
    cache_type_v: str
    attn: bool  # attention statistics (the observation window)
    window: int
    window_share: float  # share of the decode steps that compute the window (1 without window on demand)
    layer_dist: bool
    entropy_top_k: int | None
    stride: int = 1  # prompt rows with signals: every stride-th (the default policy's signal stride)


PROMPT_TOKENS, REPLY_TOKENS = 1024, 512  # the request the two settings are compared on


def size_class(cells: int) -> int:
    """The cells a context of ``cells`` is timed at: rounded up to a multiple of :data:`MIN_FILL` (256), at
    most :data:`MAX_FILL` (attention's cost per step grows with the cells, so the faster setting can change
    with the size; the classes keep the timings to eight per model)."""
    return min(MAX_FILL, max(MIN_FILL, -(-cells // MIN_FILL) * MIN_FILL))


def engine_workload(threads: int, capacity: int, cache_type_k: str = "f16", cache_type_v: str = "f16",
                    statistics: bool = True, stride: int = 1) -> Workload:
    """The workload every engine of ``capacity`` cells (budget + buffer, or the whole context) is timed on,
    whatever its own policy, so that engines of one size class compute the same numbers: the default
    policy's statistics (the observation window in its share of the steps, the prompt's signals on every
    ``stride``-th row: the default policy's stride), without statistics for a model whose memory has nothing
    to evict."""
    return Workload(capacity=size_class(capacity), n_batch=DEFAULTS.n_batch, threads=threads,
                    cache_type_k=cache_type_k, cache_type_v=cache_type_v, attn=statistics, window=DEFAULTS.window,
                    window_share=min(1.0, DEFAULTS.window / DEFAULTS.buffer) if statistics else 0.0,
                    layer_dist=statistics, entropy_top_k=256 if statistics else None,
                    stride=stride if statistics else 1)


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def choose(model: Model, work: Workload, verbose: bool = False) -> Choice:
    """The fastest flash-attention setting for ``work`` (an engine's: :func:`engine_workload`) on ``model``
    on this machine, measured once and cached: the one of on, off and split (prompts on, steps off) with which a
    request of :data:`PROMPT_TOKENS` prompt tokens (read with the statistics, as the engine reads prompts) and a
    reply of :data:`REPLY_TOKENS` tokens (decode steps at the cache's size) takes the least time."""
    key = _key(model, work)
    with _lock:
        cached = read_json(CACHE_FILE).get(key)
        if cached is None:
            if verbose or sys.stderr.isatty():
                print(f"infokv-local: timing flash attention on and off for {model.path.name} at "
                      f"{min(work.capacity, MAX_FILL)} cells on this machine (once; cached in {cache_path()})",
                      file=sys.stderr, flush=True)
            prompt, steps = _time_both(model, work)
            cached = {"prompt_s": prompt, "ms_per_token": steps, "fill": min(work.capacity, MAX_FILL),
                      "prompt_tokens": _prompt_len(work), "measured": time.strftime("%Y-%m-%d %H:%M")}
            update_json(CACHE_FILE, key, cached)
    scale = PROMPT_TOKENS / cached["prompt_tokens"]
    prompt_s = {k: cached["prompt_s"][k] * scale for k in SETTINGS}
    step_ms = cached["ms_per_token"]
    total = {k: prompt_s[k] + REPLY_TOKENS * step_ms[k] / 1e3 for k in SETTINGS}
    ranked = sorted(SETTINGS, key=lambda k: total[k])

    def said(k: str) -> str:
        return f"{total[k]:.1f} s {k} (prompt {prompt_s[k]:.1f} s, {step_ms[k]:.2f} ms per decode step)"

    reason = (f"measured on this machine: a {PROMPT_TOKENS}-token prompt and a {REPLY_TOKENS}-token reply take "
              f"{', '.join(said(k) for k in ranked)} ({work.threads} threads, {cached['fill']} cells; split: "
              f"prompts on, steps off; {cached['measured']}, cached in {cache_path()})")
    return Choice(ranked[0], reason, dict(step_ms), prompt_s)


def _time_both(model: Model, work: Workload) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per prompt and milliseconds per decode step with flash attention on, off and split (prompts on,
    steps off: the steps are those of off). The contexts are timed in the order on, off, off, on, each timing
    keeping its faster value: another job that starts or ends during the measurement, or a machine whose speed
    drifts, slows both settings alike instead of the one timed second (a verdict timed once each, one after the
    other, picked the slower setting while another job ran)."""
    prompt: dict[str, list[float]] = {k: [] for k in SETTINGS}
    steps: dict[str, list[float]] = {k: [] for k in SETTINGS}
    for setting in ("on", "off", "off", "on"):
        for k, (p, ms) in _time(model, work, setting == "on").items():
            prompt[k].append(p)
            steps[k].append(ms)
    return {k: min(v) for k, v in prompt.items()}, {k: min(v) for k, v in steps.items()}


def _prompt_len(work: Workload) -> int:
    return min(PROMPT_TOKENS, min(work.capacity, MAX_FILL) - 2 * (STEPS + 2))


def _time(model: Model, work: Workload, flash_attn: bool) -> dict[str, tuple[float, float]]:
    """Seconds to read the prompt (:func:`_prompt_len` tokens, with the statistics on and every row an output,
    in batches of ``work.n_batch``) and milliseconds per decode step at the cache's size, in a context made with
    flash attention on or off (the median step of each kind, weighted by the share of steps of that kind); a
    context made with it off also reads the prompt with it on first (``split``), then clears it."""
    fill = min(work.capacity, MAX_FILL) - 2 * (STEPS + 2)
    n_prompt = _prompt_len(work)
    with StatsContext(model, n_ctx=min(work.capacity, MAX_FILL), n_batch=work.n_batch, attn=work.attn,
                      n_last_rows=work.window, layer_dist=work.layer_dist, entropy_top_k=work.entropy_top_k,
                      n_threads=work.threads, flash_attn=flash_attn, attn_all_rows=False,
                      cache_type_k=work.cache_type_k, cache_type_v=work.cache_type_v) as ctx:
        tokens = _filler(model, fill)
        prompt_s: dict[str, float] = {}
        for setting in (("on",) if flash_attn else (SPLIT, "off")):
            ctx.clear()
            ctx.set_prompt_flash_attn(setting != "off")
            t0 = time.perf_counter()
            for s in range(0, n_prompt, work.n_batch):
                ctx.decode(tokens[s : min(s + work.n_batch, n_prompt)], s, stride=work.stride)
            prompt_s[setting] = time.perf_counter() - t0
        if work.attn:
            ctx.set_attention_active(False)
        for s in range(n_prompt, fill, work.n_batch):
            ctx.decode(tokens[s : min(s + work.n_batch, fill)], s, all_outputs=False)
        pos, tok = fill, tokens[-1]
        per_kind = []
        for with_window in (False, True):
            if work.attn:
                ctx.set_attention_active(with_window)
            times = []
            for i in range(STEPS + 2):
                t0 = time.perf_counter()
                ctx.decode([tok], pos, step=True)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
                pos += 1
            per_kind.append(statistics.median(times) * 1e3)
    share = work.window_share if work.attn else 0.0
    step_ms = (1 - share) * per_kind[0] + share * per_kind[1]
    return {k: (p, step_ms) for k, p in prompt_s.items()}


def _filler(model: Model, n: int) -> list[int]:
    text = "The quick brown fox jumps over the lazy dog while the river runs past the old mill. "
    tokens = model.tokenize(text, add_special=False)
    return (tokens * (n // len(tokens) + 1))[:n]


def _key(model: Model, work: Workload) -> str:
    parts: dict[str, Any] = {
        "version": 5,
        "model": _model_id(model.path), "cpu": _cpu_id(), "build": _build_id(),
        "n_gpu_layers": model.n_gpu_layers, "threads": work.threads, "cells": min(work.capacity, MAX_FILL),
        "batch": work.n_batch, "cache": [work.cache_type_k, work.cache_type_v],
        "stats": [work.attn, work.window if work.attn else 0, round(work.window_share, 3) if work.attn else 0,
                  work.layer_dist, work.entropy_top_k, work.stride],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@functools.cache
def _model_id(path: Path) -> str:
    """The model file's size and a hash of its first and last 64 KiB (its header, tensor index and last
    weights): the same file under another name or folder (a copy, the Hugging Face cache) shares its verdicts."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 16))
        f.seek(max(size - (1 << 16), 0))
        h.update(f.read(1 << 16))
    return h.hexdigest()[:24]


@functools.cache
def _cpu_id() -> str:
    """The CPU's model and instruction-set flags (what the kernels' speed depends on)."""
    model_name, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model_name:
                model_name = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {model_name} {flags}".encode()).hexdigest()[:16]


@functools.cache
def _build_id() -> str:
    """The loaded llama.cpp library's identity (its file's size and time: a rebuild changes it)."""
    path = Path(native.library_path())
    try:
        st = path.stat()
        return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return path.name


def choose_flash_attention(model: Model, all_rows: bool, flash_attn: FlashAttn, cache_type_v: str,
                           n_threads: int | None, capacity: int = MAX_FILL, statistics: bool = True,
                           policy_name: str = "h2o", check_only: bool = False, cache_type_k: str = "f16",
                           stride: int = 1) -> tuple[FlashAttn, str]:
    """The flash-attention setting of a context and why (:class:`~infokv_local.engine.Engine`'s docstring): as
    asked, forced by a quantized V cache (on) or by statistics over every query row (``all_rows``: off),
    llama.cpp's ``auto`` on a GPU or without attention layers, else the faster one measured here for a
    context of ``capacity`` cells (:func:`engine_workload`; ``stride``: the default policy's). Raises
    :class:`CacheSettingsError` for a combination that cannot run; ``check_only`` stops after the checks."""
    if flash_attn is not None and not isinstance(flash_attn, bool) and flash_attn != SPLIT:
        raise CacheSettingsError(f"flash_attn must be True, False, 'split' (on for prompts, off for one-token "
                                 f"steps) or None (chosen by measurement), got {flash_attn!r}")
    if all_rows and flash_attn:
        raise CacheSettingsError(f"policy {policy_name!r} needs the attention of every query row, which "
                                 f"exists only with flash attention off: leave flash_attn unset or False")
    if is_quantized(cache_type_v):
        if all_rows or flash_attn is False or flash_attn == SPLIT:
            raise CacheSettingsError(
                f"a quantized V cache ({cache_type_v}) needs flash attention on every call, and "
                + (f"policy {policy_name!r} needs it off (the attention of every query row)" if all_rows
                   else f"flash_attn is {flash_attn!r}") + ": use cache_type_v='f16' or another policy")
        return True, f"on: the quantized V cache ({cache_type_v}) needs it"
    if check_only:
        return flash_attn, ""
    if flash_attn is not None:
        return flash_attn, f"{label(flash_attn)}: as asked (flash_attn={flash_attn!r})"
    if all_rows:
        return False, (f"off: policy {policy_name!r} needs the attention of every query row, which only the "
                       f"explicit softmax has")
    if model.on_gpu:
        return None, "auto: llama.cpp's choice, layers run on a GPU (where the fused kernel is fast)"
    if model.info.memory == "recurrent":
        return None, "auto: llama.cpp's choice, the model has no attention layers"
    choice = choose(model, engine_workload(resolve_threads(n_threads), capacity, cache_type_k, cache_type_v,
                                           statistics=statistics, stride=stride))
    setting: FlashAttn = SPLIT if choice.setting == SPLIT else choice.setting == "on"
    return setting, f"{choice.setting}: {choice.reason}"
