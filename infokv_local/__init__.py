"""infokv-local: long reasoning with local GGUF models inside a fixed KV-cache budget.

A patched llama.cpp (``install/patches/``) reports, for every decode call, the signals the InfoKV eviction
policy needs (top-k predictive entropy, layer-wise representation change, attention mass per KV
cell) and removes single tokens from the cache.

The names below load on first use, so that parts without llama.cpp (the policies, the settings, the
errors, ``python -m infokv_local install``) import without the patched library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BudgetError,
    CacheFull,
    ContextFullError,
    DecodeError,
    EmptyPromptError,
    ForkRefused,
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
from .llamacpp import openmp

openmp.configure()  # before llama.cpp (and its OpenMP runtime) is loaded

if TYPE_CHECKING:
    from .api import CacheMap, InfoKVLlama
    from .models.embedded import default_model_path

_LAZY = {"CacheMap": ".api", "InfoKVLlama": ".api", "default_model_path": ".models.embedded"}

__all__ = [
    "BudgetError",
    "CacheFull",
    "CacheMap",
    "ContextFullError",
    "InfoKVLlama",
    "DecodeError",
    "EmptyPromptError",
    "ForkRefused",
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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
