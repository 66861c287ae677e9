"""``InfoKVLlama``: a llama-cpp-python-like API whose KV cache stays inside a fixed budget.

One job per module: :mod:`.llama` the object, its state and its lifetime (its methods call the
functions of the next three), :mod:`.prompt` prompt building and prefix reuse, :mod:`.completion` the
completion chunks (streaming, stops, logprobs, grammars), :mod:`.chat` chat conversion, :mod:`.kv` what
the cache holds (the ``kv`` block, the cache map), :mod:`.types` the results as ``TypedDict`` classes.
"""

from __future__ import annotations

from ..llamacpp import require_installed

require_installed()  # before anything imports llama_cpp

from .kv import CacheMap
from .llama import InfoKVLlama, SavedConversation, model_lock
from .types import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionDelta,
    ChatCompletionLogprobs,
    ChatCompletionLogprobToken,
    ChatCompletionMessage,
    ChatCompletionTopLogprob,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionTimings,
    CompletionUsage,
    FinishReason,
    KVStats,
    RequestKVStats,
)

__all__ = [
    "CacheMap",
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
    "InfoKVLlama",
    "KVStats",
    "RequestKVStats",
    "SavedConversation",
    "model_lock",
]
