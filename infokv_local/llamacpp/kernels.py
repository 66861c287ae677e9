"""Per-step hot kernels (C++ through cffi, built by ``python -m infokv_local install``)."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ..errors import UnpatchedLibraryError

try:
    from .._kernels import ffi, lib
except ImportError as e:  # pragma: no cover - exercised only on a half-built checkout
    raise UnpatchedLibraryError(
        "The native kernels of infokv-local are not built. Build them with:\n    make setup   "
        "(or: python -m infokv_local install)"
    ) from e


def topk_entropy(logits: np.ndarray, k: int = 256, n_threads: int = 1) -> np.ndarray:
    """Entropy (nats) of the softmax over the ``k`` largest logits of each row (k <= 0: full vocabulary),
    rows spread over ``n_threads`` threads.

    InfoKV (arXiv 2606.26875) scores tokens with this top-k restricted predictive entropy, k = 256.
    """
    x = np.ascontiguousarray(logits, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"logits must be 1-D or 2-D, got shape {logits.shape}")
    out = np.empty(x.shape[0], dtype=np.float32)
    lib.infokv_topk_entropy(ffi.from_buffer("float[]", x), x.shape[0], x.shape[1], k, ffi.from_buffer("float[]", out),
                            max(1, n_threads))
    return out


def topk_entropy_ctx(ctx_ptr: object, rows: np.ndarray, n_vocab: int, k: int, n_threads: int = 1) -> np.ndarray:
    """:func:`topk_entropy` of output rows of the last decode of a llama context, read in place."""
    idx = np.ascontiguousarray(rows, dtype=np.int32)
    out = np.empty(idx.size, dtype=np.float32)
    ctx = ffi.cast("struct llama_context *", _address(ctx_ptr))
    lib.infokv_topk_entropy_ctx(ctx, ffi.from_buffer("int32_t[]", idx), idx.size, n_vocab, k,
                                ffi.from_buffer("float[]", out), max(1, n_threads))
    return out


def _address(ptr: Any) -> int:
    return ctypes.cast(ptr, ctypes.c_void_p).value or 0
