"""``InfoKVLlama``: a llama-cpp-python-like API whose KV cache stays inside a fixed budget.

One job per module: :mod:`.llama` the object and its lifetime, :mod:`.prompt` prompt building and
prefix reuse, :mod:`.completion` the completion chunks (streaming, stops, logprobs, grammars),
:mod:`.chat` chat conversion, :mod:`.kv` what the cache holds (the ``kv`` block, the cache map).
"""

from __future__ import annotations

from ..llamacpp import require_installed

require_installed()  # before anything imports llama_cpp

from .kv import CacheMap
from .llama import InfoKVLlama, SavedConversation, model_lock

__all__ = ["CacheMap", "InfoKVLlama", "SavedConversation", "model_lock"]
