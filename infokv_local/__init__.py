"""infokv-local: long reasoning with local GGUF models inside a fixed KV-cache budget.

A patched llama.cpp (``patches/``) reports, for every decode call, the signals the InfoKV eviction
policy needs (top-k predictive entropy, layer-wise representation change, attention mass per KV
cell) and removes single tokens from the cache.
"""

from .api import CacheMap, InfoKVLlama
from .errors import (
    BudgetError,
    CacheFull,
    ContextFullError,
    DecodeError,
    EmptyPromptError,
    InfoKVError,
    InvalidTextError,
    InvalidTokenError,
    ModelFileError,
    PolicyError,
    PromptTooLongError,
    RequestCancelled,
    UnpatchedLibraryError,
    UnsupportedArchitectureError,
)
from .model import default_model_path

__all__ = [
    "BudgetError",
    "CacheFull",
    "CacheMap",
    "ContextFullError",
    "InfoKVLlama",
    "DecodeError",
    "EmptyPromptError",
    "InfoKVError",
    "InvalidTextError",
    "InvalidTokenError",
    "PolicyError",
    "ModelFileError",
    "PromptTooLongError",
    "RequestCancelled",
    "UnpatchedLibraryError",
    "UnsupportedArchitectureError",
    "default_model_path",
]
