"""Completion chunks: one request from prompt to the last chunk, streamed or joined.

The arguments and the dicts are those of ``llama_cpp.Llama.create_completion`` (``choices``,
``finish_reason``, ``usage``, ``logprobs`` in its shape: ``tokens``, ``text_offset``,
``token_logprobs``, ``top_logprobs``), plus a ``kv`` block in ``usage`` and in every chunk.

Functions of an :class:`~infokv_local.api.InfoKVLlama` (its ``create_completion`` and ``__call__`` call
:func:`create_completion`; :mod:`.chat` uses :func:`sampling_params` and :func:`completion_chunks`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..engine.interrupts import sigint_deferred
from ..errors import ContextFullError, EmptyPromptError, RequestCancelled
from ..llamacpp.sampling import SamplingParams, check_grammar
from .kv import RequestRun, request_kv
from .prompt import PromptPlan, prompt_of, text_of
from .text_stream import StopMatcher, Utf8Pieces, token_bytes
from .types import Completion, CompletionChunk, CompletionLogprobs, CompletionTimings, FinishReason

if TYPE_CHECKING:
    from .llama import InfoKVLlama

CompletionResult = Completion | Iterator[CompletionChunk]  # a whole result, or its chunks with stream=True


@dataclass
class _Logprobs:
    """The logprobs of the tokens released in one chunk (llama-cpp-python's ``CompletionLogprobs``)."""

    tokens: list[str] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)

    def as_dict(self) -> CompletionLogprobs:
        return {"tokens": self.tokens, "text_offset": self.text_offset, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs}


def create_completion(
    llm: InfoKVLlama,
    prompt: str | bytes,
    *,  # every argument given by InfoKVLlama's method, which holds the defaults
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    min_p: float,
    top_k: int,
    stop: str | bytes | list[str | bytes] | None,
    frequency_penalty: float,
    presence_penalty: float,
    repeat_penalty: float,
    stream: bool,
    seed: int | None,
    logprobs: int | None,
    echo: bool,
    grammar: Any,
    logit_bias: dict[int | str, float] | None,
    cancel: threading.Event | None,
    max_prompt_tokens: int | None,
) -> CompletionResult:
    """:meth:`InfoKVLlama.create_completion <infokv_local.api.InfoKVLlama.create_completion>` of ``llm``."""
    text = prompt_of(prompt)
    params = sampling_params(llm, temperature, top_p, min_p, top_k, frequency_penalty, presence_penalty,
                             repeat_penalty, seed, _grammar_text(grammar), logit_bias)
    chunks = completion_chunks(llm, text, True, max_tokens, params, _stops(stop), f"cmpl-{uuid.uuid4()}",
                               logprobs=_n_logprobs(logprobs), echo=echo, cancel=cancel,
                               max_prompt_tokens=_prompt_limit(max_prompt_tokens))
    return chunks if stream else _join_completion(chunks)


def sampling_params(llm: InfoKVLlama, temperature: float, top_p: float, min_p: float, top_k: int,
                    frequency_penalty: float, presence_penalty: float, repeat_penalty: float, seed: int | None,
                    grammar: str | None = None, logit_bias: dict[int | str, float] | None = None) -> SamplingParams:
    """The request's sampling parameters; counts the request in ``llm``'s calls (the default seed)."""
    if grammar is not None:
        check_grammar(llm.model, grammar)
    if seed is None:  # reproducible runs, yet successive calls differ (as a stateful RNG would)
        seed = llm.seed + llm._calls
    llm._calls += 1
    return SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k,
                          frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                          repeat_penalty=repeat_penalty, seed=seed & 0xFFFFFFFF, grammar=grammar,
                          logit_bias=SamplingParams.bias_of(logit_bias, llm.model.info.n_vocab))


def _token_logprobs(llm: InfoKVLlama, tok: int, n: int) -> tuple[str, float, dict[str, float]]:
    """The sampled token's text and log-probability, and the ``n`` most probable tokens with theirs,
    from the logits row it was sampled from (still in the context until the token is decoded)."""
    z = llm.engine.ctx.logits(-1).astype(np.float64)
    top = float(z.max())
    lp = z - (top + np.log(np.exp(z - top).sum()))
    best = np.argpartition(-lp, n - 1)[:n] if 0 < n < len(lp) else np.arange(len(lp) if n else 0)
    best = best[np.argsort(-lp[best], kind="stable")]
    piece = lambda t: token_bytes(llm.model, int(t)).decode("utf-8", "ignore")  # noqa: E731
    tops = {piece(t): float(lp[t]) for t in best}
    text = piece(tok)
    tops[text] = float(lp[tok])
    return text, float(lp[tok]), tops


def read_prompt(llm: InfoKVLlama, prompt: str, add_bos: bool, max_prompt_tokens: int | None = None,
                cancel: threading.Event | None = None) -> tuple[PromptPlan, int, int]:
    """Read ``prompt`` into ``llm``'s cache, keeping what the cache holds of it already (:class:`PromptCache`),
    a chunk at a time with the model's lock taken per chunk. Returns the plan, the tokens kept before its
    tokens and the tokens read. On an error (a cancel too) what was read is recorded as read, then raised;
    the caller records the tokens of a prompt read whole (:meth:`PromptCache.add_fed`)."""
    e = llm.engine
    applied: PromptPlan | None = None  # the prompt's plan, once the cache was cut to what it keeps
    n_kept = n_fed = 0
    try:
        plan = llm._prompt.plan(e, llm.model, prompt, add_bos, limit=max_prompt_tokens, cancel=cancel,
                                lock=llm._lock)
        if not plan.tokens and not plan.kept_segments:
            raise EmptyPromptError("the prompt is empty: give at least one token of text")
        with llm._lock:
            llm._prompt.apply(e, plan)
            applied = plan
        n_kept = len(e.tokens)
        reader = e.feed(plan.tokens)
        try:
            while True:  # a chunk at a time, so that other sessions and a cancel get their turn in between
                _check(cancel, "the prompt was read")
                with llm._lock:
                    if next(reader, None) is None:
                        break
        finally:
            reader.close()
            n_fed = len(e.tokens) - n_kept
    except BaseException:
        if applied is not None:
            with llm._lock, sigint_deferred():
                llm._prompt.add_fed(llm.model, applied, n_fed)
        raise
    return plan, n_kept, n_fed


def completion_chunks(llm: InfoKVLlama, prompt: str, add_bos: bool, max_tokens: int | None,
                      sampling: SamplingParams, stops: list[str], cid: str, logprobs: int | None = None,
                      echo: bool = False, cancel: threading.Event | None = None,
                      max_prompt_tokens: int | None = None) -> Iterator[CompletionChunk]:
    """The request's chunks. The model's lock is held while llama.cpp works, never across a
    yield nor while the prompt is tokenized: the consumer may run each step on another thread, and
    other sessions on the same model take turns prompt chunk by prompt chunk and token by token.
    ``cancel`` (set from any thread) stops the request at the next prompt chunk or token with
    :class:`~infokv_local.errors.RequestCancelled`; what was read and generated until then stays
    cached and recorded, so the conversation goes on from there."""
    created = int(time.time())
    llm._refuse_while_streaming("starting another")
    llm._active = True
    e = llm.engine
    t_start = time.perf_counter()
    try:
        plan, n_kept, n_fed = read_prompt(llm, prompt, add_bos, max_prompt_tokens, cancel)
    except BaseException:
        llm._active = False
        raise
    try:
        n_before = n_kept + len(plan.tokens)
        run = RequestRun(prompt_tokens=n_before, reused_tokens=plan.kept_tokens, first_step=e.totals.steps,
                         t_start=t_start)
        limit = _limit(max_tokens, llm.model.info.n_ctx_train)
        with llm._lock:
            gen = e.generate([], limit, sampling)
            echoed = _echo_logprobs(llm, prompt, add_bos) if echo and logprobs is not None else None
    except BaseException:
        with llm._lock, sigint_deferred():
            llm._prompt.add_fed(llm.model, plan, n_fed)
        llm._active = False
        raise
    assert isinstance(gen, Generator)
    utf8, stopper = Utf8Pieces(), StopMatcher(stops)
    base = len(prompt)  # text_offset counts from the prompt's start, as llama-cpp-python's does
    queued: list[tuple[int, str, float, dict[str, float]]] = []  # (offset in the completion, token, lp, top)
    produced = released = 0  # characters of completion text decoded, and released in chunks

    def chunk(text: str, finish_reason: FinishReason | None, lp: _Logprobs | None = None) -> CompletionChunk:
        nonlocal released
        if logprobs is not None and lp is None and finish_reason is None:
            released += len(text)
            lp = _Logprobs()
            while queued and queued[0][0] < released:
                off, tok_text, tok_lp, top = queued.pop(0)
                lp.tokens.append(tok_text)
                lp.text_offset.append(base + off)
                lp.token_logprobs.append(tok_lp)
                lp.top_logprobs.append(top)
        with llm._lock:
            kv = request_kv(llm, run)
        c: CompletionChunk = {
            "id": cid, "object": "text_completion", "created": created, "model": llm.model_path,
            "choices": [{"text": text, "index": 0, "logprobs": lp.as_dict() if lp is not None else None,
                         "finish_reason": finish_reason}],
            "kv": kv}
        if finish_reason is not None:
            c["usage"] = {"prompt_tokens": run.prompt_tokens, "completion_tokens": run.completion_tokens,
                          "total_tokens": run.prompt_tokens + run.completion_tokens, "kv": c["kv"]}
            c["timings"] = _timings(run)
        return c

    try:
        if echo:
            yield chunk(prompt, None, echoed)
        finish: FinishReason = "length"
        while True:
            _check(cancel, "the reply was generated")
            with llm._lock:
                try:
                    tok = next(gen, None)
                except ContextFullError:
                    if run.t_first is None:
                        raise  # not even the first token fits
                    tok = None  # as llama-cpp-python does: the reply ends for lack of room
                    limit = run.completion_tokens
                entry = _token_logprobs(llm, tok, logprobs) if tok is not None and logprobs is not None \
                    else None
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
            decoded = utf8.push(token_bytes(llm.model, tok))
            if entry is not None:
                queued.append((produced, *entry))
            produced += len(decoded)
            text, stopped = stopper.push(decoded)
            if text:
                yield chunk(text, None)
            if stopped:
                finish = "stop"
                break
        yield chunk("", finish)
    finally:
        with llm._lock, sigint_deferred():  # a Ctrl-C now must not leave the pieces half-recorded
            gen.close()
            llm._prompt.add_fed(llm.model, plan, n_fed)
            llm._prompt.add_generated(llm.model, e.tokens[n_before:])
        llm._active = False


def _prompt_limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"max_prompt_tokens must be a positive whole number of tokens (got {limit!r})")
    return limit


def _check(cancel: threading.Event | None, during: str) -> None:
    if cancel is not None and cancel.is_set():
        raise RequestCancelled(f"the request was cancelled while {during}")


def _grammar_text(grammar: Any) -> str | None:
    """A GBNF text from a string or a ``llama_cpp.LlamaGrammar`` (which keeps it in ``_grammar``)."""
    if grammar is None or isinstance(grammar, str):
        return grammar
    text = getattr(grammar, "_grammar", None)
    if not isinstance(text, str):
        raise TypeError(f"grammar must be a GBNF string or a llama_cpp.LlamaGrammar (got {type(grammar).__name__})")
    return text


def _n_logprobs(logprobs: int | None) -> int | None:
    if logprobs is None:
        return None
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0:
        raise ValueError(f"logprobs must be an integer >= 0: the number of most probable tokens (got {logprobs!r})")
    return logprobs


def _echo_logprobs(llm: InfoKVLlama, prompt: str, add_bos: bool) -> _Logprobs:
    """The echoed prompt's tokens, with null log-probabilities (the prompt's logits are not kept)."""
    lp = _Logprobs()
    offset = 0
    utf8 = Utf8Pieces()
    for t in llm.model.tokenize(prompt, add_special=add_bos, parse_special=True):
        piece = utf8.push(token_bytes(llm.model, t))
        lp.tokens.append(token_bytes(llm.model, t).decode("utf-8", "ignore"))
        lp.text_offset.append(offset)
        lp.token_logprobs.append(None)
        lp.top_logprobs.append(None)
        offset += len(piece)
    return lp


def _limit(max_tokens: int | None, n_ctx_train: int) -> int:
    return max_tokens if max_tokens is not None and max_tokens > 0 else n_ctx_train


def _stops(stop: str | bytes | list[str | bytes] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, (str, bytes)) else list(stop)
    return [text_of(s, f"stop sequence {i + 1}" if len(stops) > 1 else "stop sequence") for i, s in enumerate(stops)]


def _timings(run: RequestRun) -> CompletionTimings:
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


def _join_completion(chunks: Iterator[CompletionChunk]) -> Completion:
    text = []
    last: CompletionChunk | None = None
    joined: CompletionLogprobs | None = None
    for c in chunks:
        choice = c["choices"][0]
        text.append(choice["text"])
        lp = choice["logprobs"]
        if lp is not None:
            joined = joined or {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
            joined["tokens"].extend(lp["tokens"])
            joined["text_offset"].extend(lp["text_offset"])
            joined["token_logprobs"].extend(lp["token_logprobs"])
            joined["top_logprobs"].extend(lp["top_logprobs"])
        last = c
    assert last is not None  # the chunks end with the one that has the finish_reason (or raise)
    return {
        "id": last["id"], "object": "text_completion", "created": last["created"], "model": last["model"],
        "choices": [{"text": "".join(text), "index": 0, "logprobs": joined,
                     "finish_reason": last["choices"][0]["finish_reason"]}],
        "usage": last["usage"], "timings": last["timings"],
    }
