"""The dicts :class:`~infokv_local.api.InfoKVLlama` returns, as ``TypedDict`` classes.

They are llama-cpp-python's shapes (``llama_cpp.llama_types``: ``CreateCompletionResponse``,
``CreateChatCompletionResponse`` and their stream chunks, ``CompletionLogprobs``,
``ChatCompletionLogprobs``), plus what is ours: the ``kv`` block (in ``usage`` and in every chunk) and
llama-server's ``timings``. At run time they are plain dicts. Keys present only in some dicts (the last
chunk's ``usage`` and ``timings``, a chat delta's ``role`` or ``content``) are in ``total=False`` classes.
"""

from __future__ import annotations

from typing import Literal, TypedDict

FinishReason = Literal["stop", "length"]


class KVStats(TypedDict):
    """The ``kv`` block of :meth:`~infokv_local.api.InfoKVLlama.kv_stats`: what the cache holds since the
    conversation began (``budget`` and ``buffer`` are None with a policy that does not evict)."""

    policy: str
    budget: int | None
    buffer: int | None
    capacity: int
    used_cells: int
    max_used_cells: int
    kv_bytes: int
    kv_bytes_per_token: int
    # the memory's kind ("dense", "sliding-window", "hybrid", "recurrent") and its bounded part beside the
    # cache the budget counts (docs/memory.md)
    memory: str
    bounded_bytes: int
    bounded_cells: int | None
    total_bytes: int
    # saved states of the bounded part that an edited or regenerated turn goes back to (host memory, not KV)
    checkpoints: int
    checkpoint_bytes: int
    evictions: int
    evicted_tokens: int
    compactions: int
    prompt_probe: int  # the probe's length in tokens, 0 when off
    probes: int
    sequence_tokens: int
    n_threads: int
    flash_attn: str  # "on", "off", "split" (on for prompts, off for one-token steps) or "auto" (llama.cpp's)
    flash_attn_reason: str
    eviction_note: str | None
    cache_type_k: str
    cache_type_v: str


class RequestKVStats(KVStats):
    """A request's ``kv`` block (``usage["kv"]`` and every chunk's ``kv``): :class:`KVStats` and the request's own."""

    request_max_used_cells: int
    reused_tokens: int
    tokens_per_s: float | None


class CompletionLogprobs(TypedDict):
    """llama-cpp-python's ``CompletionLogprobs`` (Python floats; None for an echoed prompt's tokens)."""

    tokens: list[str]
    text_offset: list[int]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(TypedDict):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionUsage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    kv: RequestKVStats


class CompletionTimings(TypedDict):
    """llama-server's timing fields."""

    prompt_n: int
    prompt_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_second: float


class Completion(TypedDict):
    """The result of ``create_completion`` (llama-cpp-python's ``CreateCompletionResponse``)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    timings: CompletionTimings


class _CompletionChunk(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    kv: RequestKVStats


class CompletionChunk(_CompletionChunk, total=False):
    """A chunk of ``create_completion(stream=True)``; the last one (with a ``finish_reason``) also has
    ``usage`` and ``timings``."""

    usage: CompletionUsage
    timings: CompletionTimings


class ChatCompletionTopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class ChatCompletionLogprobToken(TypedDict):
    token: str
    bytes: list[int]
    logprob: float
    top_logprobs: list[ChatCompletionTopLogprob]


class ChatCompletionLogprobs(TypedDict):
    """OpenAI's chat ``logprobs`` block (llama-cpp-python's ``ChatCompletionLogprobs``)."""

    content: list[ChatCompletionLogprobToken] | None
    refusal: list[ChatCompletionLogprobToken] | None


class ChatCompletionMessage(TypedDict):
    role: Literal["assistant"]
    content: str


class ChatCompletionChoice(TypedDict):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatCompletionLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(TypedDict):
    """The result of ``create_chat_completion`` (llama-cpp-python's ``CreateChatCompletionResponse``)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage
    timings: CompletionTimings


class ChatCompletionDelta(TypedDict, total=False):
    """The first chunk's delta has the ``role``, the text's chunks ``content``, the last one neither."""

    role: Literal["assistant"]
    content: str


class ChatCompletionChunkChoice(TypedDict):
    index: int
    delta: ChatCompletionDelta
    logprobs: ChatCompletionLogprobs | None
    finish_reason: FinishReason | None


class _ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    kv: RequestKVStats


class ChatCompletionChunk(_ChatCompletionChunk, total=False):
    """A chunk of ``create_chat_completion(stream=True)`` (llama-cpp-python's
    ``CreateChatCompletionStreamResponse``); the last one also has ``usage`` and ``timings``."""

    usage: CompletionUsage
    timings: CompletionTimings


__all__ = [
    "ChatCompletion",
    "ChatCompletionChoice",
    "ChatCompletionChunk",
    "ChatCompletionChunkChoice",
    "ChatCompletionDelta",
    "ChatCompletionLogprobToken",
    "ChatCompletionLogprobs",
    "ChatCompletionMessage",
    "ChatCompletionTopLogprob",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "CompletionTimings",
    "CompletionUsage",
    "FinishReason",
    "KVStats",
    "RequestKVStats",
]
