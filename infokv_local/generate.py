"""A short generation through the patched llama.cpp with every signal collected (no eviction yet).

This is the first slice of the command line: it proves the whole path (GGUF metadata chat
template through llama-cpp-python's formatter, prefill and decode on a StatsContext, llama.cpp's
sampler chain) and prints what the cache holds and what the signals say.
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from llama_cpp import llama_cpp as llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .context import StatsContext
from .model import Model


@dataclass
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int
    used_cells: int
    mean_entropy: float
    prefill_s: float
    decode_s: float


def token_piece(model: Model, token: int) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = llama.llama_token_to_piece(model.vocab, token, buf, len(buf), 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama.llama_token_to_piece(model.vocab, token, buf, len(buf), 0, False)
    return buf.raw[:n]


def chat_prompt(model: Model, user_message: str, system: str | None = None) -> str:
    """The prompt text for one user turn, from the chat template in the GGUF metadata."""
    template = model.meta("tokenizer.chat_template")
    if not template:
        return user_message
    eos = token_piece(model, llama.llama_vocab_eos(model.vocab)).decode("utf-8", "replace")
    bos = token_piece(model, llama.llama_vocab_bos(model.vocab)).decode("utf-8", "replace")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user_message}
    ]
    return Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=messages).prompt


def generate(model: Model, prompt: str, max_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
             n_ctx: int = 2048, stats: GenerationStats | None = None) -> Iterator[str]:
    """Yield the completion's text pieces; fill ``stats`` at the end."""
    tokens = model.tokenize(prompt, add_special=True, parse_special=True)
    if len(tokens) + max_tokens > n_ctx:
        raise ValueError(f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceed n_ctx={n_ctx}")
    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    if temperature > 0:
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(temperature))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
    else:
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
    entropies: list[float] = []
    pending = b""
    try:
        with StatsContext(model, n_ctx=n_ctx, n_batch=512) as ctx:
            t0 = time.perf_counter()
            for s in range(0, len(tokens), ctx.n_batch):
                sig = ctx.decode(tokens[s : s + ctx.n_batch], s)
                entropies.extend(sig.entropy_at.tolist())
            t1 = time.perf_counter()
            n_out = 0
            pos = len(tokens)
            while n_out < max_tokens:
                tok = llama.llama_sampler_sample(chain, ctx.ptr, -1)
                if llama.llama_vocab_is_eog(model.vocab, tok):
                    break
                n_out += 1
                pending += token_piece(model, tok)
                try:
                    text = pending.decode("utf-8")
                    pending = b""
                    yield text
                except UnicodeDecodeError:
                    pass  # a multi-byte character split across tokens
                if n_out == max_tokens:
                    break  # the last token needs no forward pass
                sig = ctx.decode([tok], pos)
                entropies.extend(sig.entropy_at.tolist())
                pos += 1
            if stats is not None:
                stats.prompt_tokens = len(tokens)
                stats.completion_tokens = n_out
                stats.used_cells = ctx.n_used
                stats.mean_entropy = float(np.nanmean(entropies))
                stats.prefill_s = t1 - t0
                stats.decode_s = time.perf_counter() - t1
    finally:
        llama.llama_sampler_free(chain)


def run(model_path: str, prompt: str, max_tokens: int, temperature: float, seed: int, raw: bool) -> None:
    with Model(model_path) as model:
        text = prompt if raw else chat_prompt(model, prompt)
        stats = GenerationStats(0, 0, 0, 0.0, 0.0, 0.0)
        for piece in generate(model, text, max_tokens=max_tokens, temperature=temperature, seed=seed, stats=stats):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        prefill_tps = stats.prompt_tokens / max(stats.prefill_s, 1e-9)
        decode_tps = stats.completion_tokens / max(stats.decode_s, 1e-9)
        print(
            f"[{model.path.name}] prompt {stats.prompt_tokens} tok ({prefill_tps:.0f} tok/s), "
            f"completion {stats.completion_tokens} tok ({decode_tps:.1f} tok/s), "
            f"KV cells used {stats.used_cells}, mean top-256 entropy {stats.mean_entropy:.2f} nats",
            file=sys.stderr,
        )
