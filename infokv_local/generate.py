"""Generation of text under a KV budget through the engine (the command line's ``generate``).

Chat prompts use the chat template from the GGUF metadata through llama-cpp-python's Jinja2
formatter; sampling is llama.cpp's sampler chain; eviction is the engine's.
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from llama_cpp import llama_cpp as llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .engine import Engine
from .model import Model
from .sampling import SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    used_cells: int = 0
    max_used_cells: int = 0
    evictions: int = 0
    evicted_tokens: int = 0
    kv_bytes: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0


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


def detokenize_stream(model: Model, tokens: Iterator[int]) -> Iterator[str]:
    """Text pieces of a token stream, holding back bytes of a character split across tokens."""
    pending = b""
    for tok in tokens:
        pending += token_piece(model, tok)
        try:
            text = pending.decode("utf-8")
        except UnicodeDecodeError:
            continue
        pending = b""
        yield text
    if pending:
        yield pending.decode("utf-8", "replace")


def generate(engine: Engine, prompt: str, max_tokens: int = 64, sampling: SamplingParams | None = None,
             stats: GenerationStats | None = None) -> Iterator[str]:
    """Yield the completion's text pieces; fill ``stats`` at the end."""
    model = engine.model
    tokens = model.tokenize(prompt, add_special=True, parse_special=True)
    t0 = time.perf_counter()
    n_out = 0
    t_first: float | None = None

    def counted() -> Iterator[int]:
        nonlocal n_out, t_first
        for tok in engine.generate(tokens, max_tokens, sampling):
            if t_first is None:
                t_first = time.perf_counter()
            n_out += 1
            yield tok

    yield from detokenize_stream(model, counted())
    if stats is not None:
        end = time.perf_counter()
        t = engine.totals
        stats.prompt_tokens = len(tokens)
        stats.completion_tokens = n_out
        stats.used_cells = engine.used_cells
        stats.max_used_cells = t.max_used_cells
        stats.evictions = t.evictions
        stats.evicted_tokens = t.evicted_tokens
        stats.kv_bytes = engine.used_cells * engine.kv_bytes_per_cell
        stats.prefill_s = (t_first or end) - t0
        stats.decode_s = end - (t_first or end)


def run(model_path: str, prompt: str, max_tokens: int, sampling: SamplingParams, raw: bool, policy: str,
        budget: int, buffer: int) -> None:
    with Model(model_path) as model, Engine(model, policy, budget=budget, buffer=buffer) as engine:
        text = prompt if raw else chat_prompt(model, prompt)
        st = GenerationStats()
        for piece in generate(engine, text, max_tokens=max_tokens, sampling=sampling, stats=st):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        prefill_tps = st.prompt_tokens / max(st.prefill_s, 1e-9)
        decode_tps = max(st.completion_tokens - 1, 0) / max(st.decode_s, 1e-9)
        print(
            f"[{model.path.name}, {policy}, budget {budget} + buffer {buffer}] prompt {st.prompt_tokens} tok "
            f"({prefill_tps:.0f} tok/s), completion {st.completion_tokens} tok ({decode_tps:.1f} tok/s); "
            f"KV cells used {st.used_cells} (max {st.max_used_cells}, {st.kv_bytes / 2**20:.1f} MiB), "
            f"{st.evicted_tokens} tokens evicted in {st.evictions} compressions",
            file=sys.stderr,
        )
