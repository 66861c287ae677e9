"""``InfoKVLlama``: a llama-cpp-python-like API whose KV cache stays inside a fixed budget.

The completion and chat methods take the same arguments and return the same OpenAI-style dicts
as ``llama_cpp.Llama`` (choices, finish_reason, usage; chunk dicts with ``stream=True``). What is
new: the budget and the eviction policy, and a ``kv`` block (in ``usage`` and in every chunk)
telling what the cache holds. Successive calls reuse the compressed cache for the part of the
prompt it already holds (a chat's history), instead of prefilling it again.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from llama_cpp import llama_cpp as llama
from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter

from .engine import ContextFullError, Engine, kv_bytes_per_token
from .model import Model
from .policies import Policy
from .sampling import SamplingParams
from .text_stream import StopMatcher, Utf8Pieces, token_bytes

_model_locks: weakref.WeakKeyDictionary[Model, threading.Lock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model: Model) -> threading.Lock:
    """The lock that queues generation on one loaded model (shared by every InfoKVLlama on it)."""
    with _locks_guard:
        lock = _model_locks.get(model)
        if lock is None:
            lock = _model_locks[model] = threading.Lock()
        return lock


@dataclass
class CacheMap:
    """The conversation's tokens and what the cache holds of them (for display)."""

    pieces: list[str]  # the text of every token of the sequence (control tokens as their text; a character
    # split across tokens is on the token that completes it)
    in_cache: np.ndarray  # bool per token
    score: np.ndarray  # the policy's score per cached token (higher = kept longer); NaN otherwise
    protected: np.ndarray  # bool per token: a sink or recent token, never evicted
    evicted: np.ndarray  # bool per token: removed from the cache (not in_cache and not the undecoded last token)


@dataclass
class _Run:
    """Book-keeping of one request."""

    prompt_tokens: int
    reused_tokens: int
    first_step: int
    t_start: float
    t_first: float | None = None
    completion_tokens: int = 0
    max_used_cells: int = 0
    steps_seen: int = 0  # engine steps already folded into max_used_cells


class InfoKVLlama:
    """A GGUF model generating under a fixed KV-cache budget, used like ``llama_cpp.Llama``.

    ``model_path`` is a GGUF file or an already loaded :class:`~infokv_local.model.Model` (shared,
    e.g. between chat sessions; it is then not closed here). ``budget`` (tokens) or ``budget_mib``
    (MiB of KV memory) is what the cache is compressed to, ``buffer`` how far it grows between
    compressions; the ``n_sink`` first and ``n_recent`` last tokens are never evicted (``n_ctx``
    sizes the context of the non-evicting ``full`` policy; default the model's trained context). ``policy`` is
    a name (``infokv``, ``h2o``, ``snapkv``, ``tova``, ``streaming``, ``full``...; parameters as
    ``"infokv:alpha=0.9"``) or a :class:`~infokv_local.policies.Policy`.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | Model,
        *,
        policy: str | Policy = "infokv",
        budget: int | None = 1024,
        budget_mib: float | None = None,
        buffer: int = 128,
        n_sink: int = 4,
        n_recent: int = 32,
        window: int = 32,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int = 0,
        n_ctx: int | None = None,
        check_invariants: bool = False,
    ) -> None:
        if isinstance(model_path, Model):
            self.model, self._owns_model = model_path, False
        else:
            self.model, self._owns_model = Model(model_path, n_gpu_layers=n_gpu_layers), True
        self.model_path = str(self.model.path)
        self.seed = seed
        self._calls = 0
        self._lock = model_lock(self.model)
        self._engine_args: dict[str, Any] = dict(
            policy=policy, budget=None if budget_mib is not None else budget, budget_mib=budget_mib, buffer=buffer,
            n_sink=n_sink, n_recent=n_recent, window=window, n_batch=n_batch, n_threads=n_threads, seed=seed,
            max_context=n_ctx, check_invariants=check_invariants,
        )
        self._engine: Engine | None = None
        try:
            self._engine = Engine(self.model, **self._engine_args)
        except BaseException:
            self._free()
            raise
        self._segments: list[tuple[bytes, int]] = []  # the sequence's text, as (bytes, n_tokens) pieces
        self._formatter: Jinja2ChatFormatter | None = None
        self._active = False  # a request's chunks are being read

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str, *, cache_dir: str | None = None,
                        **kwargs: Any) -> InfoKVLlama:
        """Load ``filename`` (a name or a glob) of a Hugging Face Hub repository, downloaded through
        huggingface-hub or taken from its local cache when offline."""
        from .hub import hf_model_file

        return cls(hf_model_file(repo_id, filename, cache_dir=cache_dir), **kwargs)

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise ValueError("this InfoKVLlama is closed")
        return self._engine

    def close(self) -> None:
        """Free the context (and the model, unless it was passed in loaded)."""
        with self._lock:
            self._free()

    def _free(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._owns_model:
            self.model.close()

    def __enter__(self) -> InfoKVLlama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # no lock: the collector may run this on a thread that holds it; nobody else can use this context
        if getattr(self, "_lock", None) is not None:
            self._free()

    def reset(self) -> None:
        """Forget the conversation: the cache is emptied and the statistics restart."""
        with self._lock:
            self.engine.reset()
            self._segments = []

    def configure(self, *, policy: str | Policy | None = None, budget: int | None = None,
                  budget_mib: float | None = None, buffer: int | None = None, n_sink: int | None = None,
                  n_recent: int | None = None) -> None:
        """Change the policy or the budget. The cache is rebuilt: the next call prefills its prompt again.

        On a bad value (e.g. a budget too small for the protected tokens) nothing changes.
        """
        args = dict(self._engine_args)
        for key, value in dict(policy=policy, buffer=buffer, n_sink=n_sink, n_recent=n_recent).items():
            if value is not None:
                args[key] = value
        if budget is not None or budget_mib is not None:
            args["budget"], args["budget_mib"] = budget, budget_mib
        with self._lock:
            new = Engine(self.model, **args)  # raises before anything is replaced
            self.engine.close()
            self._engine, self._engine_args, self._segments = new, args, []

    # ---- what the cache holds --------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        return self.engine.kv_bytes_per_cell

    @staticmethod
    def budget_mib_for(model: Model, tokens: int) -> float:
        """MiB of KV memory that ``tokens`` cached tokens take for this model."""
        return tokens * kv_bytes_per_token(model) / 2**20

    def kv_stats(self) -> dict[str, Any]:
        """The ``kv`` block: policy, budget, cells in use (now and the most at any step), KV bytes,
        compressions and evicted tokens, since the last reset."""
        e = self.engine
        t = e.totals
        used = e.used_cells
        return {
            "policy": e.policy.name,
            "budget": e.budget if e.policy.evicts else None,
            "buffer": e.buffer if e.policy.evicts else None,
            "capacity": e.capacity,
            "used_cells": used,
            "max_used_cells": max(t.max_used_cells, used),
            "kv_bytes": used * e.kv_bytes_per_cell,
            "kv_bytes_per_token": e.kv_bytes_per_cell,
            "evictions": t.evictions,
            "evicted_tokens": t.evicted_tokens,
            "compactions": e.compactions,
            "sequence_tokens": len(e.tokens),
            "n_threads": e.n_threads,
        }

    def cell_history(self) -> list[tuple[int, int]]:
        """(tokens read so far, cells in use) before and after every engine step since the last reset:
        the saw-tooth of grow-and-compress."""
        points: list[tuple[int, int]] = []
        n = 0
        for s in self.engine.totals.history:
            if s.evicted:  # the drop of a compression, just before this step's tokens went in
                points.append((n, s.used_cells - s.n_tokens))
            n += s.n_tokens
            points.append((n, s.used_cells))
        return points

    def cache_map(self) -> CacheMap:
        """Every token of the sequence, whether it is still cached, and the policy's score of it."""
        with self._lock:
            e = self.engine
            idx, scores, protected = e.token_scores()
            n = len(e.tokens)
            pending = e.pending_token is not None
            utf8 = Utf8Pieces()  # a character split across tokens is shown on the token that completes it
            pieces = [utf8.push(token_bytes(self.model, t, special=True)) for t in e.tokens]
        in_cache = np.zeros(n, dtype=bool)
        score = np.full(n, np.nan)
        prot = np.zeros(n, dtype=bool)
        ok = (idx >= 0) & (idx < n)
        in_cache[idx[ok]] = True
        score[idx[ok]] = scores[ok]
        prot[idx[ok]] = protected[ok]
        evicted = ~in_cache
        if n and pending:
            evicted[-1] = False
        return CacheMap(pieces=pieces, in_cache=in_cache, score=score, protected=prot, evicted=evicted)

    # ---- tokens ----------------------------------------------------------------------------------
    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Tokens of ``text`` (llama.cpp's tokenizer; same signature as ``Llama.tokenize``)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return self.model.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        return b"".join(token_bytes(self.model, t, special) for t in tokens)

    # ---- completion ------------------------------------------------------------------------------
    def create_completion(
        self,
        prompt: str,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        top_k: int = 40,
        stop: str | list[str] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        stream: bool = False,
        seed: int | None = None,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Complete ``prompt``; the arguments and the result are those of ``Llama.create_completion``.

        ``max_tokens`` None or <= 0 means until an end-of-generation token (at most the model's
        trained context length of new tokens). The result's ``usage`` has a ``kv`` block; with
        ``stream=True`` every chunk has one too.
        """
        sampling = self._sampling(temperature, top_p, min_p, top_k, frequency_penalty, presence_penalty,
                                  repeat_penalty, seed)
        chunks = self._completion_chunks(prompt, True, max_tokens, sampling, _stops(stop),
                                         f"cmpl-{uuid.uuid4()}")
        return chunks if stream else _join_completion(chunks)

    def create_chat_completion(
        self,
        messages: list[dict[str, Any]],
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        stream: bool = False,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Reply to a conversation, formatted by the chat template in the GGUF metadata.

        Arguments and result as ``Llama.create_chat_completion``. Pass the whole history each
        turn: the part the cache already holds is not prefilled again.
        """
        formatted = self._chat_formatter()(messages=messages)
        sampling = self._sampling(temperature, top_p, min_p, top_k, frequency_penalty, presence_penalty,
                                  repeat_penalty, seed)
        chunks = self._completion_chunks(formatted.prompt, not formatted.added_special, max_tokens, sampling,
                                         _stops(stop), f"chatcmpl-{uuid.uuid4()}")
        return _chat_chunks(chunks) if stream else _chat_result(_join_completion(chunks))

    # ---- internals -------------------------------------------------------------------------------
    def _sampling(self, temperature: float, top_p: float, min_p: float, top_k: int, frequency_penalty: float,
                  presence_penalty: float, repeat_penalty: float, seed: int | None) -> SamplingParams:
        if seed is None:  # reproducible runs, yet successive calls differ (as a stateful RNG would)
            seed = self.seed + self._calls
        self._calls += 1
        return SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k,
                              frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                              repeat_penalty=repeat_penalty, seed=seed & 0xFFFFFFFF)

    def _chat_formatter(self) -> Jinja2ChatFormatter:
        if self._formatter is None:
            template = self.model.meta("tokenizer.chat_template") or CHATML_CHAT_TEMPLATE
            vocab = self.model.vocab
            eos = token_bytes(self.model, llama.llama_vocab_eos(vocab), True).decode("utf-8", "replace")
            bos = token_bytes(self.model, llama.llama_vocab_bos(vocab), True).decode("utf-8", "replace")
            self._formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        return self._formatter

    def _prompt_tokens(self, prompt: str, add_bos: bool) -> tuple[list[int], int]:
        """The tokens to feed for ``prompt`` and how many cached tokens are kept as its beginning.

        The cache is kept for the longest run of whole pieces (prompt chunks fed earlier, generated
        tokens) that begins ``prompt``; tokens after that are dropped if still cached, otherwise
        the cache is cleared and the whole prompt is fed.
        """
        e = self.engine
        data = prompt.encode("utf-8")
        kept_bytes = kept_tokens = n_segments = 0
        if sum(n for _, n in self._segments) == len(e.tokens):
            for seg, n in self._segments:
                if not data.startswith(seg, kept_bytes):
                    break
                kept_bytes += len(seg)
                kept_tokens += n
                n_segments += 1
        # something must be fed after a truncation (its logits are gone), and the rest must start a character
        while n_segments and ((kept_tokens < len(e.tokens) and kept_bytes == len(data))
                              or (kept_bytes < len(data) and data[kept_bytes] & 0xC0 == 0x80)):
            n_segments -= 1
            seg, n = self._segments[n_segments]
            kept_bytes -= len(seg)
            kept_tokens -= n
        if n_segments and e.truncate(kept_tokens):
            del self._segments[n_segments:]
            rest = data[kept_bytes:]
            tokens = self.model.tokenize(rest.decode("utf-8"), add_special=False, parse_special=True) if rest else []
            if rest:
                self._segments.append((rest, len(tokens)))
            return tokens, kept_tokens
        e.reset()
        tokens = self.model.tokenize(prompt, add_special=add_bos, parse_special=True)
        self._segments = [(data, len(tokens))]
        return tokens, 0

    def _completion_chunks(self, prompt: str, add_bos: bool, max_tokens: int | None, sampling: SamplingParams,
                           stops: list[str], cid: str) -> Iterator[dict[str, Any]]:
        """The request's chunks. The model's lock is held while llama.cpp works, never across a
        yield: the consumer may run each step on another thread, and other sessions on the same
        model take turns token by token."""
        created = int(time.time())
        if self._active:
            raise RuntimeError("a streamed completion is still open on this InfoKVLlama: read it to the end or "
                               "close() it before starting another")
        self._active = True
        try:
            with self._lock:
                e = self.engine
                t_start = time.perf_counter()
                tokens, reused = self._prompt_tokens(prompt, add_bos)
                if not tokens and not e.tokens:
                    raise ValueError("the prompt is empty")
                n_before = len(e.tokens) + len(tokens)
                run = _Run(prompt_tokens=n_before, reused_tokens=reused, first_step=e.totals.steps,
                           t_start=t_start)
                limit = _limit(max_tokens, self.model.info.n_ctx_train)
                gen = e.generate(tokens, limit, sampling)
        except BaseException:
            self._active = False
            raise
        utf8, stopper = Utf8Pieces(), StopMatcher(stops)
        consistent = False  # True once the prompt is in and the sequence's tokens are known

        def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
            c = {"id": cid, "object": "text_completion", "created": created, "model": self.model_path,
                 "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
                 "kv": self._kv(run)}
            if finish_reason is not None:
                c["usage"] = {"prompt_tokens": run.prompt_tokens, "completion_tokens": run.completion_tokens,
                              "total_tokens": run.prompt_tokens + run.completion_tokens, "kv": c["kv"]}
                c["timings"] = _timings(run)
            return c

        try:
            finish = "length"
            while True:
                with self._lock:
                    try:
                        tok = next(gen, None)
                    except ContextFullError:
                        if run.t_first is None:
                            raise  # the prompt itself does not fit
                        tok = None  # as llama-cpp-python does: the reply ends for lack of room
                        limit = run.completion_tokens
                consistent = True
                if tok is None:
                    if run.completion_tokens < limit:
                        finish = "stop"  # an end-of-generation token
                    text, stopped = stopper.push(utf8.flush())
                    text += "" if stopped else stopper.flush()
                    if text:
                        yield chunk(text, None)
                    break
                if run.t_first is None:
                    run.t_first = time.perf_counter()
                run.completion_tokens += 1
                text, stopped = stopper.push(utf8.push(token_bytes(self.model, tok)))
                if text:
                    yield chunk(text, None)
                if stopped:
                    finish = "stop"
                    break
            yield chunk("", finish)
        finally:
            with self._lock:
                gen.close()
                if consistent:
                    self._segments.extend((token_bytes(self.model, t), 1) for t in e.tokens[n_before:])
                else:  # stopped inside the prompt: what the cache holds is not known piece by piece
                    self._segments = []
            self._active = False

    def _kv(self, run: _Run) -> dict[str, Any]:
        history = self.engine.totals.history
        steps = history[max(run.steps_seen, run.first_step):]
        run.max_used_cells = max([run.max_used_cells, *(st.used_cells for st in steps)])
        run.steps_seen = len(history)
        kv = self.kv_stats()
        kv["max_used_cells"] = max(run.max_used_cells, kv["used_cells"])
        kv["reused_tokens"] = run.reused_tokens
        now = time.perf_counter()
        kv["tokens_per_s"] = (run.completion_tokens - 1) / (now - run.t_first) if run.t_first and \
            run.completion_tokens > 1 else None
        return kv


def _limit(max_tokens: int | None, n_ctx_train: int) -> int:
    return max_tokens if max_tokens is not None and max_tokens > 0 else n_ctx_train


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _timings(run: _Run) -> dict[str, Any]:
    """llama-server's timing fields."""
    now = time.perf_counter()
    first = run.t_first or now
    prompt_ms = (first - run.t_start) * 1e3
    predicted_ms = (now - first) * 1e3
    fed = run.prompt_tokens - run.reused_tokens
    return {
        "prompt_n": fed, "prompt_ms": prompt_ms, "prompt_per_second": fed / max(prompt_ms / 1e3, 1e-9),
        "predicted_n": run.completion_tokens, "predicted_ms": predicted_ms,
        "predicted_per_second": max(run.completion_tokens - 1, 0) / max(predicted_ms / 1e3, 1e-9),
    }


def _join_completion(chunks: Iterator[dict[str, Any]]) -> dict[str, Any]:
    text = []
    last: dict[str, Any] = {}
    for c in chunks:
        text.append(c["choices"][0]["text"])
        last = c
    return {
        "id": last["id"], "object": "text_completion", "created": last["created"], "model": last["model"],
        "choices": [{"text": "".join(text), "index": 0, "logprobs": None,
                     "finish_reason": last["choices"][0]["finish_reason"]}],
        "usage": last["usage"], "timings": last["timings"],
    }


def _chat_result(done: dict[str, Any]) -> dict[str, Any]:
    choice = done["choices"][0]
    return {
        "id": done["id"], "object": "chat.completion", "created": done["created"], "model": done["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": choice["text"]}, "logprobs": None,
                     "finish_reason": choice["finish_reason"]}],
        "usage": done["usage"], "timings": done["timings"],
    }


def _chat_chunks(chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    first = True
    try:
        for c in chunks:
            base = {"id": c["id"], "object": "chat.completion.chunk", "created": c["created"], "model": c["model"]}
            if first:
                yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                            "finish_reason": None}], "kv": c["kv"]}
                first = False
            choice = c["choices"][0]
            delta = {"content": choice["text"]} if choice["finish_reason"] is None else {}
            out = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": choice["finish_reason"]}], "kv": c["kv"]}
            for key in ("usage", "timings"):
                if key in c:
                    out[key] = c[key]
            yield out
    finally:
        chunks.close()  # type: ignore[attr-defined]


__all__ = ["CacheMap", "InfoKVLlama", "model_lock"]
