"""Chat conversion: messages through the GGUF's chat template in, OpenAI chat dicts and chunks out.

Functions of an :class:`~infokv_local.api.InfoKVLlama` (its ``create_chat_completion`` calls
:func:`create_chat_completion`).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from .completion import (
    _grammar_text,
    _join_completion,
    _n_logprobs,
    _prompt_limit,
    _stops,
    completion_chunks,
    sampling_params,
)
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionDelta,
    ChatCompletionLogprobs,
    Completion,
    CompletionChunk,
    CompletionLogprobs,
)

if TYPE_CHECKING:
    from .llama import InfoKVLlama

ChatCompletionResult = ChatCompletion | Iterator[ChatCompletionChunk]  # a whole reply, or its chunks with stream=True


def create_chat_completion(
    llm: InfoKVLlama,
    messages: list[dict[str, Any]],
    *,  # every argument given by InfoKVLlama's method, which holds the defaults
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    stream: bool,
    stop: str | bytes | list[str | bytes] | None,
    seed: int | None,
    max_tokens: int | None,
    presence_penalty: float,
    frequency_penalty: float,
    repeat_penalty: float,
    logprobs: bool | None,
    top_logprobs: int | None,
    response_format: dict[str, Any] | None,
    grammar: Any,
    logit_bias: dict[int | str, float] | None,
    cancel: threading.Event | None,
    max_prompt_tokens: int | None,
) -> ChatCompletionResult:
    """:meth:`InfoKVLlama.create_chat_completion <infokv_local.api.InfoKVLlama.create_chat_completion>` of
    ``llm``."""
    prompt, add_bos = chat_prompt(llm, messages)
    gbnf = _grammar_text(grammar)
    if response_format is not None:
        if gbnf is not None:
            raise ValueError("give grammar or response_format, not both")
        gbnf = _response_format_grammar(response_format)
    n_top = None
    if logprobs:
        n_top = 0 if top_logprobs is None else top_logprobs
    elif top_logprobs is not None:
        raise ValueError("top_logprobs needs logprobs=True")
    params = sampling_params(llm, temperature, top_p, min_p, top_k, frequency_penalty, presence_penalty,
                             repeat_penalty, seed, gbnf, logit_bias)
    chunks = completion_chunks(llm, prompt, add_bos, max_tokens, params,
                               _stops(stop), f"chatcmpl-{uuid.uuid4()}", logprobs=_n_logprobs(n_top),
                               cancel=cancel, max_prompt_tokens=_prompt_limit(max_prompt_tokens))
    return _chat_chunks(chunks) if stream else _chat_result(_join_completion(chunks))


def chat_prompt(llm: InfoKVLlama, messages: list[dict[str, Any]]) -> tuple[str, bool]:
    """The text ``messages`` make through ``llm``'s chat template, and whether a BOS token goes before it."""
    formatted = chat_formatter(llm)(messages=messages)  # type: ignore[arg-type]  # OpenAI message dicts
    return formatted.prompt, not formatted.added_special


def chat_formatter(llm: InfoKVLlama) -> Jinja2ChatFormatter:
    """``llm``'s chat template (the GGUF's, else ChatML) as llama-cpp-python's formatter, made once."""
    if llm._formatter is None:
        template = llm.model.meta("tokenizer.chat_template") or CHATML_CHAT_TEMPLATE
        # a vocabulary without the token (id -1) gives the template an empty string
        eos, bos = (llm.model.token_bytes(t, True).decode("utf-8", "replace") if t >= 0 else ""
                    for t in (llm.model.eos_token_id, llm.model.bos_token_id))
        llm._formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
    return llm._formatter


def _response_format_grammar(fmt: dict[str, Any]) -> str | None:
    """The GBNF grammar of an OpenAI ``response_format``."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return str(json_schema_to_gbnf(json.dumps(fmt["schema"]))) if "schema" in fmt else str(JSON_GBNF)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError('response_format {"type": "json_schema"} needs "json_schema": {"schema": {...}}')
        return str(json_schema_to_gbnf(json.dumps(spec["schema"])))
    raise ValueError(f"unsupported response_format {fmt!r}: use {{'type': 'json_object'}} (optionally with a "
                     f"'schema'), {{'type': 'json_schema', 'json_schema': {{'schema': ...}}}} or {{'type': 'text'}}")


def _chat_logprobs(lp: CompletionLogprobs | None) -> ChatCompletionLogprobs | None:
    """llama-cpp-python's completion logprobs in the OpenAI chat shape."""
    if lp is None:
        return None
    return {
        "content": [
            # a chat never echoes its prompt: every token has a log-probability
            {"token": tok, "bytes": list(tok.encode("utf-8")), "logprob": cast(float, logprob),
             "top_logprobs": [{"token": t, "logprob": p, "bytes": list(t.encode("utf-8"))}
                              for t, p in (top or {}).items()]}
            for tok, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True)
        ],
        "refusal": None,
    }


def _chat_result(done: Completion) -> ChatCompletion:
    choice = done["choices"][0]
    return {
        "id": done["id"], "object": "chat.completion", "created": done["created"], "model": done["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": choice["text"]},
                     "logprobs": _chat_logprobs(choice["logprobs"]), "finish_reason": choice["finish_reason"]}],
        "usage": done["usage"], "timings": done["timings"],
    }


def _chat_chunks(chunks: Iterator[CompletionChunk]) -> Iterator[ChatCompletionChunk]:
    first = True
    try:
        for c in chunks:
            if first:
                yield {"id": c["id"], "object": "chat.completion.chunk", "created": c["created"], "model": c["model"],
                       "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                    "finish_reason": None}], "kv": c["kv"]}
                first = False
            choice = c["choices"][0]
            delta: ChatCompletionDelta = {"content": choice["text"]} if choice["finish_reason"] is None else {}
            out: ChatCompletionChunk = {
                "id": c["id"], "object": "chat.completion.chunk", "created": c["created"], "model": c["model"],
                "choices": [{"index": 0, "delta": delta, "logprobs": _chat_logprobs(choice["logprobs"]),
                             "finish_reason": choice["finish_reason"]}], "kv": c["kv"]}
            if "usage" in c:
                out["usage"] = c["usage"]
            if "timings" in c:
                out["timings"] = c["timings"]
            yield out
    finally:
        chunks.close()  # type: ignore[attr-defined]
