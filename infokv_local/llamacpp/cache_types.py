"""KV-cache data types (llama.cpp's ``type_k`` / ``type_v``) and the bytes a cached row takes in each.

Block sizes and bytes per block are ggml's (``ggml/src/ggml.c``, ``type_traits``): a ``q8_0``
block holds 32 values in 34 bytes, ``q4_0`` 32 in 18, and so on. llama.cpp needs flash attention
for a quantized V cache.
"""

from __future__ import annotations

from ..errors import CacheSettingsError

# name -> (values per block, bytes per block)
CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q5_1": (32, 24),
    "q5_0": (32, 22),
    "q4_1": (32, 20),
    "q4_0": (32, 18),
    "iq4_nl": (32, 18),
}
UNQUANTIZED = frozenset({"f32", "f16", "bf16"})


def check_cache_type(name: str, which: str = "cache_type") -> str:
    """The lower-case type name, or a ValueError listing the supported ones."""
    key = str(name).lower()
    if key not in CACHE_TYPES:
        raise CacheSettingsError(f"{which} {name!r} is not a KV-cache type llama.cpp supports here: use one of "
                         f"{', '.join(CACHE_TYPES)}")
    return key


def row_bytes(name: str, n_values: int) -> int:
    """Bytes of one row of ``n_values`` values in type ``name`` (a whole number of blocks)."""
    block, size = CACHE_TYPES[check_cache_type(name)]
    if n_values % block:
        raise CacheSettingsError(f"a {name} cache needs rows of a multiple of {block} values "
                                 f"(the row has {n_values})")
    return n_values // block * size


def is_quantized(name: str) -> bool:
    return check_cache_type(name) not in UNQUANTIZED
