"""Completion chunks: one request from prompt to the last chunk, streamed or joined.

The arguments and the dicts are those of ``llama_cpp.Llama.create_completion`` (``choices``,
``finish_reason``, ``usage``, ``logprobs`` in its shape: ``tokens``, ``text_offset``,
``token_logprobs``, ``top_logprobs``), plus a ``kv`` block in ``usage`` and in every chunk.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np

from ..engine.interrupts import sigint_deferred
from ..errors import ContextFullError, EmptyPromptError, RequestCancelled
from ..llamacpp.sampling import SamplingParams, check_grammar
from .base import _Run
from .kv import KVStatsMixin
from .prompt import PromptPlan, prompt_of, text_of
from .text_stream import StopMatcher, Utf8Pieces, token_bytes

CompletionResult = dict[str, Any] | Iterator[dict[str, Any]]  # a whole result, or its chunks with stream=True


@dataclass
class _Logprobs:
    """The logprobs of the tokens released in one chunk (llama-cpp-python's ``CompletionLogprobs``)."""

    tokens: list[str] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "text_offset": self.text_offset, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs}


class CompletionMixin(KVStatsMixin):
    """``create_completion`` and ``__call__``."""

    @overload
    def __call__(self, prompt: str | bytes, *, stream: Literal[False] = ..., **kwargs: Any) -> dict[str, Any]: ...
    @overload
    def __call__(self, prompt: str | bytes, *, stream: Literal[True], **kwargs: Any) -> Iterator[dict[str, Any]]: ...
    @overload
    def __call__(self, prompt: str | bytes, *, stream: bool, **kwargs: Any) -> CompletionResult: ...

    def __call__(self, prompt: str | bytes, *, stream: bool = False, **kwargs: Any) -> CompletionResult:
        """Same as :meth:`create_completion` (as ``Llama.__call__``)."""
        return self.create_completion(prompt, stream=stream, **kwargs)

    @overload
    def create_completion(self, prompt: str | bytes, max_tokens: int | None = ..., temperature: float = ...,
                          top_p: float = ..., min_p: float = ..., top_k: int = ...,
                          stop: str | bytes | list[str | bytes] | None = ..., frequency_penalty: float = ...,
                          presence_penalty: float = ..., repeat_penalty: float = ...,
                          stream: Literal[False] = ..., seed: int | None = ..., logprobs: int | None = ...,
                          echo: bool = ..., grammar: Any = ...,
                          logit_bias: dict[int | str, float] | None = ..., cancel: threading.Event | None = ...,
                          max_prompt_tokens: int | None = ...) -> dict[str, Any]: ...
    @overload
    def create_completion(self, prompt: str | bytes, max_tokens: int | None = ..., temperature: float = ...,
                          top_p: float = ..., min_p: float = ..., top_k: int = ...,
                          stop: str | bytes | list[str | bytes] | None = ..., frequency_penalty: float = ...,
                          presence_penalty: float = ..., repeat_penalty: float = ..., *, stream: Literal[True],
                          seed: int | None = ..., logprobs: int | None = ..., echo: bool = ...,
                          grammar: Any = ...,
                          logit_bias: dict[int | str, float] | None = ..., cancel: threading.Event | None = ...,
                          max_prompt_tokens: int | None = ...) -> Iterator[dict[str, Any]]: ...
    @overload
    def create_completion(self, prompt: str | bytes, max_tokens: int | None = ..., temperature: float = ...,
                          top_p: float = ..., min_p: float = ..., top_k: int = ...,
                          stop: str | bytes | list[str | bytes] | None = ..., frequency_penalty: float = ...,
                          presence_penalty: float = ..., repeat_penalty: float = ..., stream: bool = ...,
                          seed: int | None = ..., logprobs: int | None = ..., echo: bool = ...,
                          grammar: Any = ...,
                          logit_bias: dict[int | str, float] | None = ..., cancel: threading.Event | None = ...,
                          max_prompt_tokens: int | None = ...) -> CompletionResult: ...

    def create_completion(
        self,
        prompt: str | bytes,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        top_k: int = 40,
        stop: str | bytes | list[str | bytes] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        stream: bool = False,
        seed: int | None = None,
        logprobs: int | None = None,
        echo: bool = False,
        grammar: Any = None,
        logit_bias: dict[int | str, float] | None = None,
        cancel: threading.Event | None = None,
        max_prompt_tokens: int | None = None,
    ) -> CompletionResult:
        """Complete ``prompt``; the arguments and the result are those of ``Llama.create_completion``
        (pass them by keyword: ``suffix``, llama-cpp-python's second positional argument, is not supported).

        ``max_tokens`` None or <= 0 means until an end-of-generation token (at most the model's
        trained context length of new tokens), as in llama-cpp-python. ``logprobs=n``: per generated
        token, its log-probability and the ``n`` most probable tokens (from the logits the token was
        sampled from, before any grammar). ``echo``: the prompt is returned before the completion.
        ``grammar``: a GBNF text or a ``llama_cpp.LlamaGrammar``, applied by llama.cpp's grammar
        sampler. ``logit_bias``: token id (an int, or its string as in the OpenAI API) to a value added to
        its logit before sampling; ``-inf`` bans it. The result's ``usage`` has a ``kv`` block; with
        ``stream=True`` every chunk has one too.

        Not in llama-cpp-python: ``cancel``, a ``threading.Event`` that another thread may set to stop the
        request at the next prompt chunk or generated token (the call, or the stream, raises
        :class:`~infokv_local.errors.RequestCancelled`; what was read and generated stays cached, and the
        next call reuses it); ``max_prompt_tokens``, the most prompt tokens the call may read (the part
        of the prompt not cached already): a longer one raises
        :class:`~infokv_local.errors.PromptTooLongError` before anything changes, found without
        tokenizing all of a huge prompt.
        """
        text = prompt_of(prompt)
        sampling = self._sampling(temperature, top_p, min_p, top_k, frequency_penalty, presence_penalty,
                                  repeat_penalty, seed, _grammar_text(grammar), logit_bias)
        chunks = self._completion_chunks(text, True, max_tokens, sampling, _stops(stop), f"cmpl-{uuid.uuid4()}",
                                         logprobs=_n_logprobs(logprobs), echo=echo, cancel=cancel,
                                         max_prompt_tokens=_prompt_limit(max_prompt_tokens))
        return chunks if stream else _join_completion(chunks)

    # ---- internals -------------------------------------------------------------------------------
    def _sampling(self, temperature: float, top_p: float, min_p: float, top_k: int, frequency_penalty: float,
                  presence_penalty: float, repeat_penalty: float, seed: int | None,
                  grammar: str | None = None,
                  logit_bias: dict[int | str, float] | None = None) -> SamplingParams:
        if grammar is not None:
            check_grammar(self.model, grammar)
        if seed is None:  # reproducible runs, yet successive calls differ (as a stateful RNG would)
            seed = self.seed + self._calls
        self._calls += 1
        return SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k,
                              frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                              repeat_penalty=repeat_penalty, seed=seed & 0xFFFFFFFF, grammar=grammar,
                              logit_bias=SamplingParams.bias_of(logit_bias, self.model.info.n_vocab))

    def _token_logprobs(self, tok: int, n: int) -> tuple[str, float, dict[str, float]]:
        """The sampled token's text and log-probability, and the ``n`` most probable tokens with theirs,
        from the logits row it was sampled from (still in the context until the token is decoded)."""
        z = self.engine.ctx.logits(-1).astype(np.float64)
        top = float(z.max())
        lp = z - (top + np.log(np.exp(z - top).sum()))
        best = np.argpartition(-lp, n - 1)[:n] if 0 < n < len(lp) else np.arange(len(lp) if n else 0)
        best = best[np.argsort(-lp[best], kind="stable")]
        piece = lambda t: token_bytes(self.model, int(t)).decode("utf-8", "ignore")  # noqa: E731
        tops = {piece(t): float(lp[t]) for t in best}
        text = piece(tok)
        tops[text] = float(lp[tok])
        return text, float(lp[tok]), tops

    def _completion_chunks(self, prompt: str, add_bos: bool, max_tokens: int | None, sampling: SamplingParams,
                           stops: list[str], cid: str, logprobs: int | None = None, echo: bool = False,
                           cancel: threading.Event | None = None,
                           max_prompt_tokens: int | None = None) -> Iterator[dict[str, Any]]:
        """The request's chunks. The model's lock is held while llama.cpp works, never across a
        yield nor while the prompt is tokenized: the consumer may run each step on another thread, and
        other sessions on the same model take turns prompt chunk by prompt chunk and token by token.
        ``cancel`` (set from any thread) stops the request at the next prompt chunk or token with
        :class:`~infokv_local.errors.RequestCancelled`; what was read and generated until then stays
        cached and recorded, so the conversation goes on from there."""
        created = int(time.time())
        self._refuse_while_streaming("starting another")
        self._active = True
        e = self.engine
        applied: PromptPlan | None = None  # the prompt's plan, once the cache was cut to what it keeps
        n_fed = 0  # of its tokens, read into the cache so far
        try:
            t_start = time.perf_counter()
            plan = self._prompt.plan(e, self.model, prompt, add_bos, limit=max_prompt_tokens, cancel=cancel,
                                     lock=self._lock)
            if not plan.tokens and not plan.kept_segments:
                raise EmptyPromptError("the prompt is empty: give at least one token of text")
            with self._lock:
                self._prompt.apply(e, plan)
                applied = plan
            n_kept = len(e.tokens)
            n_before = n_kept + len(plan.tokens)
            run = _Run(prompt_tokens=n_before, reused_tokens=plan.kept_tokens, first_step=e.totals.steps,
                       t_start=t_start)
            limit = _limit(max_tokens, self.model.info.n_ctx_train)
            reader = e.feed(plan.tokens)
            try:
                while True:  # a chunk at a time, so that other sessions and a cancel get their turn in between
                    _check(cancel, "the prompt was read")
                    with self._lock:
                        if next(reader, None) is None:
                            break
            finally:
                reader.close()
                n_fed = len(e.tokens) - n_kept
            with self._lock:
                gen = e.generate([], limit, sampling)
                echoed = _echo_logprobs(self, prompt, add_bos) if echo and logprobs is not None else None
        except BaseException:
            if applied is not None:
                with self._lock, sigint_deferred():
                    self._prompt.add_fed(self.model, applied, n_fed)
            self._active = False
            raise
        assert isinstance(gen, Generator)
        utf8, stopper = Utf8Pieces(), StopMatcher(stops)
        base = len(prompt)  # text_offset counts from the prompt's start, as llama-cpp-python's does
        queued: list[tuple[int, str, float, dict[str, float]]] = []  # (offset in the completion, token, lp, top)
        produced = released = 0  # characters of completion text decoded, and released in chunks

        def chunk(text: str, finish_reason: str | None, lp: _Logprobs | None = None) -> dict[str, Any]:
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
            with self._lock:
                kv = self._kv(run)
            c = {"id": cid, "object": "text_completion", "created": created, "model": self.model_path,
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
            finish = "length"
            while True:
                _check(cancel, "the reply was generated")
                with self._lock:
                    try:
                        tok = next(gen, None)
                    except ContextFullError:
                        if run.t_first is None:
                            raise  # not even the first token fits
                        tok = None  # as llama-cpp-python does: the reply ends for lack of room
                        limit = run.completion_tokens
                    entry = self._token_logprobs(tok, logprobs) if tok is not None and logprobs is not None \
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
                decoded = utf8.push(token_bytes(self.model, tok))
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
            with self._lock, sigint_deferred():  # a Ctrl-C now must not leave the pieces half-recorded
                gen.close()
                self._prompt.add_fed(self.model, plan, n_fed)
                self._prompt.add_generated(self.model, e.tokens[n_before:])
            self._active = False


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


def _echo_logprobs(llm: CompletionMixin, prompt: str, add_bos: bool) -> _Logprobs:
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
    joined: dict[str, list[Any]] | None = None
    for c in chunks:
        choice = c["choices"][0]
        text.append(choice["text"])
        if choice["logprobs"] is not None:
            joined = joined or {k: [] for k in choice["logprobs"]}
            for k, v in choice["logprobs"].items():
                joined[k].extend(v)
        last = c
    return {
        "id": last["id"], "object": "text_completion", "created": last["created"], "model": last["model"],
        "choices": [{"text": "".join(text), "index": 0, "logprobs": joined,
                     "finish_reason": last["choices"][0]["finish_reason"]}],
        "usage": last["usage"], "timings": last["timings"],
    }
