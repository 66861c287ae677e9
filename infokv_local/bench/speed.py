"""Speed and memory as the sequence grows: this package under a fixed budget vs the full cache vs stock llama.cpp.

    python -m infokv_local bench speed [--quick] [--model PATH] [--lengths 1024x1024,1024x8192]
                                       [--policies full,infokv,streaming] [--budget 1024] [--buffer 128]
                                       [--rounds 1] [--threads N] [--out results/speed.json]

Every run is its own process, so that its peak RSS is its own: ``stock`` loads the unpatched
libllama (``python -m infokv_local install --stock``) through ``LLAMA_CPP_LIB_PATH`` and drives it with
llama-cpp-python's low-level bindings (the plain llama.cpp decode loop, greedy sampling through
llama.cpp's sampler chain), once with flash attention on and once off; ``infokv-local`` runs the
:class:`~infokv_local.engine.Engine` with each policy (``full`` = no eviction, a context that
holds the whole sequence). All generate ``generated_tokens`` greedy tokens after a prompt of
``prompt_tokens`` (essay text), ignoring end-of-generation. Runs are interleaved (every engine
at one length, then the next length; rounds repeat the whole sweep) so that machine noise hits
them alike; each finished run is appended to ``<out>.runs.jsonl`` and skipped when the command
is run again (a killed run resumes).

Per run: prefill and decode tokens/s, decode tokens/s in windows along the generation, cells in
use along the generation, KV bytes (cells in use at the end, and the cells the context
allocates), peak RSS, and for evicting policies the compressions and their mean time. Ratios
are taken against stock llama.cpp at its faster flash-attention setting for the same length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..llamacpp.cache_types import check_cache_type, is_quantized
from ..llamacpp.threads import default_threads
from ..settings import DEFAULTS
from .jsonl import read_log
from .overhead import stock_lib_dir
from .plain_decode import PlainDecoder

WINDOW = 256  # decode tokens per timeline point
QUICK_LENGTHS = "1024x512,1024x2048"
DEFAULT_LENGTHS = "1024x1024,4096x1024,16384x1024,1024x4096,1024x8192,1024x16384"
DEFAULT_POLICIES = "full,infokv,infokv-rkv,snapkv,h2o,tova,streaming"


FLASH_ATTN_SETTINGS: dict[str, tuple[bool | str | None, ...]] = {
    "auto": (None,), "on": (True,), "off": (False,), "split": ("split",), "both": (True, False)}


def flash_attn_list(text: str) -> tuple[bool | str | None, ...]:
    """``"auto,off"`` -> (None, False): our engine's flash-attention settings to run."""
    out: list[bool | str | None] = []
    for part in text.split(","):
        if part.strip() not in FLASH_ATTN_SETTINGS:
            raise argparse.ArgumentTypeError(f"a flash-attention setting is one of {', '.join(FLASH_ATTN_SETTINGS)} "
                                             f"(got {part.strip()!r})")
        out += [f for f in FLASH_ATTN_SETTINGS[part.strip()] if f not in out]
    return tuple(out)


def parse_lengths(text: str) -> list[tuple[int, int]]:
    """``"1024x512,4096x1024"`` -> [(1024, 512), (4096, 1024)] (prompt tokens x generated tokens)."""
    out = []
    for part in text.split(","):
        p, _, g = part.strip().lower().partition("x")
        try:
            pair = (int(p), int(g))
        except ValueError:
            raise ValueError(f"a length is PROMPTxGENERATED, e.g. 1024x4096 (got {part!r})") from None
        if pair[0] < 1 or pair[1] < 2:
            raise ValueError(f"prompt must be >= 1 and generated >= 2 tokens (got {part!r})")
        out.append(pair)
    return out


def _prompt_tokens(tokenize: Any, n: int) -> list[int]:
    from .throughput import essay_text

    text = essay_text()
    toks = tokenize(text)
    while len(toks) < n:  # repeat the essays for very long prompts
        toks += tokenize(text)[1:]
    return toks[:n]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _timeline_point(n: int, t0: float, used: int) -> dict[str, float]:
    return {"generated": n, "elapsed_s": time.perf_counter() - t0, "used_cells": used}


def kv_sizes_from_log(lines: list[str]) -> tuple[int, int]:
    """(growing bytes, bounded bytes) of the KV caches llama.cpp reports creating: a sliding-window memory logs
    its non-SWA (growing) and SWA (bounded) caches one after the other, a plain one a single cache."""
    growing = bounded = 0
    swa = False
    for line in lines:
        if "creating" in line and "KV cache" in line:
            swa = "non-SWA" not in line
        m = re.search(r"llama_kv_cache: size = +([0-9.]+) MiB", line)
        if m:
            n = round(float(m.group(1)) * 2**20)
            if swa:
                bounded += n
            else:
                growing += n
    return growing, bounded


def _worker_stock(cfg: dict[str, Any]) -> dict[str, Any]:
    from llama_cpp import llama_cpp as llama

    log_lines: list[str] = []
    # llama.cpp logs the KV caches it creates: kept to read their sizes, nothing is printed
    keep = llama.llama_log_callback(lambda _level, text, _data: log_lines.append(text.decode(errors="replace")))
    llama.llama_log_set(keep, None)
    llama.llama_backend_init()
    mparams = llama.llama_model_default_params()
    mparams.n_gpu_layers = cfg.get("gpu_layers", 0)  # the library's default offloads every layer to a GPU
    model = llama.llama_model_load_from_file(cfg["model"].encode(), mparams)
    if not model:
        raise RuntimeError(f"could not load {cfg['model']}")
    vocab = llama.llama_model_get_vocab(model)

    def tokenize(text: str) -> list[int]:
        raw = text.encode()
        buf = (llama.llama_token * (len(raw) + 8))()
        n = llama.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)
        return list(buf[:n])

    n_prompt, n_gen = cfg["prompt_tokens"], cfg["generated_tokens"]
    prompt = _prompt_tokens(tokenize, n_prompt)
    params = llama.llama_context_default_params()
    params.n_ctx = n_prompt + n_gen + 8
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = cfg["threads"]
    params.no_perf = True
    # a sliding-window cache of the window, as llama.cpp's own tools (llama-cli, llama-server) make it: the
    # library's default would size it like the full cache (more memory, slower at length)
    params.swa_full = False
    params.flash_attn_type = (llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if cfg["flash_attn"]
                              else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    cache_type = cfg.get("cache_type", "f16")
    params.type_k = params.type_v = getattr(llama, f"GGML_TYPE_{cache_type.upper()}")
    log_lines.clear()
    ctx = llama.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("could not create the context")
    growing_bytes, bounded_bytes = kv_sizes_from_log(log_lines)
    n_ctx = llama.llama_n_ctx(ctx)
    decode = PlainDecoder(ctx, 512)
    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())

    t0 = time.perf_counter()
    for s in range(0, n_prompt, 512):
        decode(prompt[s : s + 512], s)
    tok = llama.llama_sampler_sample(chain, ctx, -1)
    prefill_s = time.perf_counter() - t0
    timeline = []
    t1 = time.perf_counter()
    for i in range(1, n_gen):
        decode([tok], n_prompt + i - 1)
        tok = llama.llama_sampler_sample(chain, ctx, -1)
        if i % WINDOW == 0 or i == n_gen - 1:
            timeline.append(_timeline_point(i, t1, n_prompt + i))
    decode_s = time.perf_counter() - t1
    return {"prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": n_gen - 1, "timeline": timeline,
            "used_cells": n_prompt + n_gen - 1, "allocated_cells": int(n_ctx), "peak_rss_bytes": _peak_rss(),
            "growing_bytes_allocated": growing_bytes, "bounded_bytes": bounded_bytes}


def _worker_ours(cfg: dict[str, Any]) -> dict[str, Any]:
    from ..engine import Engine
    from ..llamacpp.model import Model
    from ..llamacpp.sampling import SamplingParams

    n_prompt, n_gen = cfg["prompt_tokens"], cfg["generated_tokens"]
    with Model(cfg["model"], n_gpu_layers=cfg.get("gpu_layers", 0)) as model:
        prompt = _prompt_tokens(model.tokenize, n_prompt)
        cache_type = cfg.get("cache_type", "f16")
        engine = Engine(model, cfg["policy"], budget=cfg["budget"], buffer=cfg["buffer"], n_threads=cfg["threads"],
                        max_context=n_prompt + n_gen + 8, flash_attn=cfg["flash_attn"], cache_type_k=cache_type,
                        cache_type_v=cache_type, prompt_probe=cfg.get("prompt_probe", False))
        with engine:
            t0 = time.perf_counter()
            gen = engine.generate(prompt, n_gen, SamplingParams(temperature=0.0), ignore_eos=True)
            next(gen)  # prefill and the first token
            prefill_s = time.perf_counter() - t0
            timeline = []
            t1 = time.perf_counter()
            i = 0
            for i, _ in enumerate(gen, start=1):
                if i % WINDOW == 0 or i == n_gen - 1:
                    timeline.append(_timeline_point(i, t1, engine.used_cells))
            decode_s = time.perf_counter() - t1
            t = engine.totals
            return {
                "prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": i, "timeline": timeline,
                "used_cells": engine.used_cells, "max_used_cells": t.max_used_cells,
                "allocated_cells": engine.ctx.n_cells, "peak_rss_bytes": _peak_rss(),
                "compressions": t.evictions, "evicted_tokens": t.evicted_tokens,
                "compress_ms_mean": 1e3 * (t.score_s + t.evict_s) / t.evictions if t.evictions else None,
                "n_threads": engine.n_threads, "flash_attn_used": engine.flash_attn, "probes": engine.probes,
                "flash_attn_reason": engine.flash_attn_reason,
                "growing_bytes_allocated": engine.ctx.growing_bytes, "bounded_bytes": engine.ctx.bounded_bytes,
                "growing_bytes_per_cell": engine.kv_bytes_per_cell,
            }


def _kv_bytes_per_cell(model_path: str, cache_type: str = "f16") -> int:
    from ..engine import kv_bytes_per_token
    from ..llamacpp.model import Model

    with Model(model_path) as model:
        return kv_bytes_per_token(model, cache_type, cache_type)


def _run_key(cfg: dict[str, Any]) -> str:
    return "|".join([*(str(cfg[k]) for k in ("round", "engine", "policy", "flash_attn", "prompt_tokens",
                                              "generated_tokens", "budget", "buffer", "threads")),
                     *([cfg["cache_type"]] if cfg.get("cache_type", "f16") != "f16" else []),
                     *(["probe"] if cfg.get("prompt_probe") else []),
                     *([f"ngl{cfg['gpu_layers']}"] if cfg.get("gpu_layers") else [])])


def _end_with_parent() -> None:
    """In a worker, before it runs: on Linux, end it when the benchmark's process ends (a killed benchmark
    would otherwise leave its worker decoding, and the next run measured beside it)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _spawn(cfg: dict[str, Any], stock_lib: str) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("LLAMA_CPP_LIB_PATH", None)
    if cfg["engine"] == "stock":
        env["LLAMA_CPP_LIB_PATH"] = stock_lib
    out = subprocess.run([sys.executable, "-m", "infokv_local.bench.speed", "--worker", json.dumps(cfg)],
                         env=env, capture_output=True, text=True, preexec_fn=_end_with_parent)
    if out.returncode != 0:
        raise RuntimeError(f"run {cfg} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan(lengths: list[tuple[int, int]], policies: list[str], rounds: int, base: dict[str, Any],
         ours_flash: tuple[bool | str | None, ...] = (None,), stock_flash: tuple[bool, ...] = (True, False),
         ours_probe: tuple[bool, ...] = (False,)) -> list[dict]:
    """The runs in the order they are made: for each round and length, stock at each of ``stock_flash`` (on
    only with a quantized cache, which needs it), then each policy at each flash-attention setting of ours
    (None: the engine's choice for the backend) and each prompt-probe setting (``ours_probe``; the evicting
    policies only). A policy that needs the attention of every query row (H2O) runs only with flash attention
    off: its flash-on runs are left out."""
    from ..policies import make_policy
    from ..policies.base import ATTENTION_ALL_ROWS

    if is_quantized(base.get("cache_type", "f16")):
        stock_flash = (True,)
    all_rows = {pol for pol in policies if ATTENTION_ALL_ROWS in make_policy(pol).needs}
    runs = []
    for r in range(rounds):
        for p, g in lengths:
            for engine, policy, fa, pb in [*(("stock", "full", f, False) for f in stock_flash),
                                           *(("infokv-local", pol, f, pb) for f in ours_flash for pol in policies
                                             for pb in (ours_probe if make_policy(pol).evicts else (False,))
                                             if not (f and pol in all_rows))]:
                runs.append({**base, "round": r, "engine": engine, "policy": policy, "flash_attn": fa,
                             "prompt_tokens": p, "generated_tokens": g, **({"prompt_probe": True} if pb else {})})
    return runs


def _flash_attn_of(run: dict[str, Any]) -> str:
    """The flash attention a run used: ``on``, ``off`` or ``split`` (runs logged before split say True/False)."""
    used = run.get("flash_attn_used", run["flash_attn"])
    return used if isinstance(used, str) else "on" if used else "off"


def summarize(records: list[dict[str, Any]], kv_bytes_per_cell: int) -> list[dict[str, Any]]:
    """One row per (engine, policy, flash_attn, length): medians over rounds, KV bytes, ratios to stock."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        policy = r["policy"] + ("+probe" if r.get("prompt_probe") else "")
        key = (r["engine"], policy, _flash_attn_of(r), r["prompt_tokens"],
               r["generated_tokens"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (engine, policy, fa, p, g), rs in groups.items():
        evicts = engine != "stock" and policy != "full"
        # the growing part: cells in use at most (as the plot) and allocated; the bounded part is allocated
        # once and in use after the window's first tokens, so it counts whole in both
        growing = max(r.get("max_used_cells", r["used_cells"]) for r in rs) * kv_bytes_per_cell
        growing_allocated = rs[0].get("growing_bytes_allocated", rs[0]["allocated_cells"] * kv_bytes_per_cell)
        bounded = rs[0].get("bounded_bytes", 0)
        rows.append({
            "engine": engine, "policy": policy, "flash_attn": fa, "prompt_tokens": p, "generated_tokens": g,
            "budget": rs[0]["budget"] if evicts else None, "buffer": rs[0]["buffer"] if evicts else None,
            "rounds": len(rs),
            "prefill_tok_s": statistics.median(p / r["prefill_s"] for r in rs),
            "decode_tok_s": statistics.median(r["decode_steps"] / r["decode_s"] for r in rs),
            "kv_bytes": growing + bounded, "kv_bytes_allocated": growing_allocated + bounded,
            "growing_bytes": growing, "growing_bytes_allocated": growing_allocated, "bounded_bytes": bounded,
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
            "compressions": rs[0].get("compressions"),
            "compress_ms_mean": rs[0].get("compress_ms_mean"),
            "probes": rs[0].get("probes"),
            "flash_attn_reason": rs[0].get("flash_attn_reason") if engine != "stock" else
            f"{fa}: stock llama.cpp is run with each setting, the ratios are against its faster",
            "timeline": rs[0]["timeline"],
        })
    for row in rows:
        stock = [s for s in rows if s["engine"] == "stock" and s["prompt_tokens"] == row["prompt_tokens"]
                 and s["generated_tokens"] == row["generated_tokens"]]
        if stock:
            best_decode = max(stock, key=lambda s: s["decode_tok_s"])
            best_prefill = max(stock, key=lambda s: s["prefill_tok_s"])
            row["decode_ratio_vs_stock_best"] = row["decode_tok_s"] / best_decode["decode_tok_s"]
            row["prefill_ratio_vs_stock_best"] = row["prefill_tok_s"] / best_prefill["prefill_tok_s"]
            row["kv_bytes_ratio_vs_stock"] = best_decode["kv_bytes"] / row["kv_bytes"]
            row["kv_bytes_allocated_ratio_vs_stock"] = best_decode["kv_bytes_allocated"] / row["kv_bytes_allocated"]
            row["growing_bytes_ratio_vs_stock"] = best_decode["growing_bytes"] / row["growing_bytes"]
    return rows


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{Path(result['model']).name}, {result['threads']} threads, budget {result['budget']} + buffer "
             f"{result['buffer']}; ratios against stock llama.cpp at its faster flash-attention setting",
             f"{'engine':13s}{'policy':14s}{'FA':>6s}{'prompt':>8s}{'gen':>7s}{'prefill/s':>11s}{'decode/s':>10s}"
             f"{'dec.ratio':>10s}{'pre.ratio':>10s}{'KV MiB':>9s}{'KV x less':>10s}{'alloc MiB':>10s}{'x less':>7s}"
             f"{'RSS MiB':>9s}{'compr.ms':>9s}"]
    for r in result["rows"]:
        cm = r["compress_ms_mean"]
        lines.append(
            f"{r['engine']:13s}{r['policy']:14s}{r['flash_attn']:>6s}{r['prompt_tokens']:>8d}"
            f"{r['generated_tokens']:>7d}{r['prefill_tok_s']:>11.0f}{r['decode_tok_s']:>10.1f}"
            f"{r.get('decode_ratio_vs_stock_best', float('nan')):>10.3f}"
            f"{r.get('prefill_ratio_vs_stock_best', float('nan')):>10.3f}{r['kv_bytes'] / 2**20:>9.1f}"
            f"{r.get('kv_bytes_ratio_vs_stock', float('nan')):>10.2f}{r['kv_bytes_allocated'] / 2**20:>10.1f}"
            f"{r.get('kv_bytes_allocated_ratio_vs_stock', float('nan')):>7.2f}{r['peak_rss_bytes'] / 2**20:>9.0f}"
            f"{'' if cm is None else f'{cm:.2f}':>9s}")
    lines.append("KV MiB: both parts of the memory, the growing one's cells in use at most and the bounded one (a "
                 "sliding-window cache) whole; alloc MiB: what llama.cpp allocates for both")
    lines.append("flash attention (FA) of each engine and why:")
    seen = set()
    for r in result["rows"]:
        label = f"  {r['engine']} {r['policy']}"
        if (label, r["flash_attn_reason"]) not in seen:
            seen.add((label, r["flash_attn_reason"]))
            lines.append(f"{label}: {r['flash_attn_reason']}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Decode tok/s and KV MiB along the generation, per engine, for the longest generation measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = max(result["rows"], key=lambda r: (r["generated_tokens"], -r["prompt_tokens"]))
    p, g = longest["prompt_tokens"], longest["generated_tokens"]
    rows = [r for r in result["rows"] if r["prompt_tokens"] == p and r["generated_tokens"] == g]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    per_cell = result["kv_bytes_per_cell"]
    for r in rows:
        label = f"{r['engine']} {r['policy']}" + (f" FA {r['flash_attn']}"
                                                   if r["engine"] == "stock" else "")
        pts = r["timeline"]
        xs, rates, prev_n, prev_t = [], [], 0, 0.0
        for pt in pts:
            dn, dt = pt["generated"] - prev_n, pt["elapsed_s"] - prev_t
            if dn > 0 and dt > 0:
                xs.append(pt["generated"])
                rates.append(dn / dt)
            prev_n, prev_t = pt["generated"], pt["elapsed_s"]
        ax1.plot(xs, rates, label=label)
        bounded = r.get("bounded_bytes", 0)
        line = ax2.plot([pt["generated"] for pt in pts], [(pt["used_cells"] * per_cell + bounded) / 2**20
                                                          for pt in pts], label=f"{label}, in use")[0]
        ax2.axhline(r["kv_bytes_allocated"] / 2**20, color=line.get_color(), linestyle=":", linewidth=1,
                    label=f"{label}, allocated")
    ax1.set(xlabel="generated tokens", ylabel=f"decode tokens/s (windows of {WINDOW})",
            title=f"decode speed, prompt {p}")
    both = any(r.get("bounded_bytes") for r in rows)
    ax2.set(xlabel="generated tokens", title="KV memory" + (", both parts" if both else ""),
            ylabel="KV MiB" + (" (growing cells in use + sliding-window cache)" if both else ""))
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(f"{Path(result['model']).name}, budget {result['budget']} + {result['buffer']}, "
                 f"{result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu or platform.processor(),
            "logical_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version()}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", help="GGUF file or registry model name, e.g. qwen2.5-coder-0.5b (default: the embedded "
                    "SmolLM2-135M)")
    ap.add_argument("--lengths", help=f"PROMPTxGENERATED pairs (default: {DEFAULT_LENGTHS}; --quick: {QUICK_LENGTHS})")
    ap.add_argument("--policies", default=DEFAULT_POLICIES,
                    help=f"policies of ours to run (default: {DEFAULT_POLICIES})")
    ap.add_argument("--budget", type=int, default=1024,
                    help="KV budget of the evicting policies (default: 1024, a long reasoning's; the other surfaces "
                         "default to 256 + 64, where a 1024-token prompt is compressed while it is read)")
    ap.add_argument("--buffer", type=int, default=128, help="growth before each compression (default: 128)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are reported (default: 1)")
    ap.add_argument("--threads", type=int, default=default_threads(), help="threads of every engine")
    ap.add_argument("--flash-attn", type=flash_attn_list, default="auto",
                    help="flash attention of our engine, one setting or several separated by commas, each run in "
                         "every round (default auto: the engine's choice, on a CPU the fastest of on, off and split "
                         "timed once per model and machine; split: on for prompts, off for one-token steps; both: "
                         "on,off)")
    ap.add_argument("--stock-flash-attn", choices=["on", "off", "both"], default="both",
                    help="flash attention of stock llama.cpp (default both; ratios are against its faster one, so "
                         "leave one out only where it is known to be the slower, e.g. on at 16K generated tokens "
                         "on a CPU where it decodes at a third of the speed)")
    ap.add_argument("--cache-type", default="f16",
                    help="K and V cache data type of every engine, e.g. q8_0 (a quantized one needs flash attention; "
                         "default: f16)")
    ap.add_argument("--prompt-probe", choices=["off", "on", "both"], default="on" if DEFAULTS.prompt_probe else "off",
                    help="the engine's prompt probe for the evicting policies (both: each policy without and with "
                         "it, shown as POLICY+probe; default: %(default)s, as every surface)")
    ap.add_argument("--quick", action="store_true", help=f"short lengths ({QUICK_LENGTHS}), policies full,infokv")
    ap.add_argument("--gpu-layers", type=int, default=0,
                    help="layers offloaded to a GPU by every engine, stock too (999: all; default 0, the CPU)")
    ap.add_argument("--stock-lib", help="folder of the unpatched libllama (default: build or reuse it)")
    ap.add_argument("--out", default="bench-speed.json", help="JSON result; runs are kept in <out>.runs.jsonl")
    ap.add_argument("--plot", help="PNG of tok/s and KV MiB along the longest generation")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..models.registry import resolve_model_path

    args.model = str(resolve_model_path(args.model))  # the workers get a file path (a name is fetched here once)
    lengths = parse_lengths(args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS))
    policies = [p.strip() for p in ("full,infokv" if args.quick and args.policies == DEFAULT_POLICIES
                                    else args.policies).split(",") if p.strip()]
    cache_type = check_cache_type(args.cache_type, "--cache-type")
    base = {"model": args.model, "budget": args.budget, "buffer": args.buffer, "threads": args.threads,
            "cache_type": cache_type, **({"gpu_layers": args.gpu_layers} if args.gpu_layers else {})}
    ours_flash = args.flash_attn  # a tuple: argparse passes the default through flash_attn_list too
    if is_quantized(cache_type) and (False in ours_flash or "split" in ours_flash):
        raise ValueError(f"--cache-type {cache_type} needs flash attention (llama.cpp's quantized V cache): "
                         f"--flash-attn asks for runs without it; use auto or on")
    stock_flash = {"on": (True,), "off": (False,), "both": (True, False)}[args.stock_flash_attn]
    if is_quantized(cache_type) and stock_flash == (False,):
        raise ValueError(f"--cache-type {cache_type} needs flash attention: --stock-flash-attn off cannot run it")
    ours_probe = {"off": (False,), "on": (True,), "both": (False, True)}[args.prompt_probe]
    todo = plan(lengths, policies, args.rounds, base, ours_flash, stock_flash, ours_probe)
    runs_path = Path(str(args.out) + ".runs.jsonl")
    done = {_run_key(rec): rec for rec in read_log(runs_path)}  # a line cut by a kill is dropped
    stock_lib = args.stock_lib or stock_lib_dir()
    records = []
    with runs_path.open("a") as log, tqdm(todo, desc="speed runs", unit="run") as bar:
        for cfg in bar:
            key = _run_key(cfg)
            if key not in done:
                bar.set_postfix_str(f"{cfg['engine']} {cfg['policy']} {cfg['prompt_tokens']}x{cfg['generated_tokens']}")
                done[key] = {**cfg, **_spawn(cfg, stock_lib)}
                log.write(json.dumps(done[key]) + "\n")
                log.flush()
            records.append(done[key])
    per_cell = _kv_bytes_per_cell(args.model, cache_type)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "model": args.model,
              "threads": args.threads, "budget": args.budget, "buffer": args.buffer, "rounds": args.rounds,
              "cache_type": cache_type, "gpu_layers": args.gpu_layers,
              "kv_bytes_per_cell": per_cell, "runs": records, "rows": summarize(records, per_cell)}
    print(format_table(result))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infokv_local bench speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        res = _worker_stock(cfg) if cfg["engine"] == "stock" else _worker_ours(cfg)
        print(json.dumps(res))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
