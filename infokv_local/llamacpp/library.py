"""The patched llama.cpp library: ctypes declarations of the infokv C API and the start-up check.

The library is the one llama-cpp-python loads; ``python -m infokv_local install`` builds it with the
diffs in ``install/patches/``. Every entry point of infokv-local calls :func:`require_patched` first.
"""

from __future__ import annotations

import ctypes
import functools

from llama_cpp import llama_cpp as _llama

from ..errors import UnpatchedLibraryError
from . import BUILD_COMMAND

EXPECTED_PATCH_VERSION = 8

lib = _llama._lib
_c_float_p = ctypes.POINTER(ctypes.c_float)
_c_int32_p = ctypes.POINTER(ctypes.c_int32)

_SIGNATURES = {
    "llama_infokv_patch_version": ([], ctypes.c_int32),
    "llama_infokv_memory_kind": ([ctypes.c_void_p], ctypes.c_int32),
    "llama_infokv_memory_bytes": ([ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64)],
                                  ctypes.c_int32),
    "llama_infokv_bounded_cells": ([ctypes.c_void_p, _c_int32_p, _c_int32_p], ctypes.c_int32),
    "llama_infokv_layer_attends_growing": ([ctypes.c_void_p, ctypes.c_int32], ctypes.c_int32),
    "llama_infokv_n_cells": ([ctypes.c_void_p], ctypes.c_int32),
    "llama_infokv_n_streams": ([ctypes.c_void_p], ctypes.c_int32),
    "llama_infokv_n_used": ([ctypes.c_void_p], ctypes.c_int32),
    "llama_infokv_seq_cells": ([ctypes.c_void_p, ctypes.c_int32, _c_int32_p, _c_int32_p, ctypes.c_int32],
                               ctypes.c_int32),
    "llama_infokv_seq_rm_cells": ([ctypes.c_void_p, ctypes.c_int32, _c_int32_p, ctypes.c_int32], ctypes.c_int32),
    "llama_infokv_set_stats": ([ctypes.c_void_p, ctypes.c_bool, ctypes.c_int32, ctypes.c_bool], ctypes.c_int32),
    "llama_infokv_set_stats_ext": ([ctypes.c_void_p, ctypes.c_bool, ctypes.c_int32, ctypes.c_bool, ctypes.c_bool],
                                   ctypes.c_int32),
    "llama_infokv_set_attn_active": ([ctypes.c_void_p, ctypes.c_bool], ctypes.c_int32),
    "llama_infokv_set_flash_attn": ([ctypes.c_void_p, ctypes.c_bool], ctypes.c_int32),
    "llama_infokv_get_attn_sum": ([ctypes.c_void_p, _c_int32_p, _c_int32_p], _c_float_p),
    "llama_infokv_get_attn_last": ([ctypes.c_void_p, _c_int32_p, _c_int32_p, _c_int32_p], _c_float_p),
    "llama_infokv_get_layer_dist": ([ctypes.c_void_p, _c_int32_p, _c_int32_p], _c_float_p),
    "llama_infokv_key_layers": ([ctypes.c_void_p, _c_int32_p, ctypes.c_int32], ctypes.c_int32),
    "llama_infokv_get_keys": ([ctypes.c_void_p, _c_int32_p, ctypes.c_int32, _c_float_p, ctypes.c_int64],
                              ctypes.c_int32),
}


def library_path() -> str:
    return str(getattr(lib, "_name", "libllama"))


@functools.cache
def require_patched() -> int:
    """Check that the loaded libllama carries the infokv patches; return the patch version."""
    try:
        version_fn = lib.llama_infokv_patch_version
    except AttributeError:
        raise UnpatchedLibraryError(
            f"The llama.cpp library loaded by llama-cpp-python ({library_path()}) is a stock build: it lacks "
            f"the infokv patches (cell removal by index, attention and layer statistics). Build and install "
            f"the patched library with:\n    {BUILD_COMMAND}"
        ) from None
    version_fn.argtypes, version_fn.restype = [], ctypes.c_int32
    version = version_fn()
    if version != EXPECTED_PATCH_VERSION:
        raise UnpatchedLibraryError(
            f"The llama.cpp library at {library_path()} carries infokv patch version {version}, this package "
            f"needs version {EXPECTED_PATCH_VERSION}. Rebuild it with:\n    {BUILD_COMMAND}"
        )
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype
    return version
