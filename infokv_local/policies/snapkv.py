"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
arXiv 2404.14469): score tokens by the attention the last ``window`` queries (the observation
window) pay them, pooled over neighbouring tokens so that whole spans survive together.

The paper pools per head with kernel size 7 and keeps per layer; llama.cpp shares one cell per token
across layers, so each layer's pooled scores are normalised and averaged over layers. The issue asks
for max pooling (kernel ``kernel_size``, odd, along position order); ``pooling="avg"`` is the
kvpress default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import PolicyError
from .base import ATTENTION, Policy, ScoreInput, layer_normalised, require


def pool1d(x: np.ndarray, kernel_size: int, mode: str) -> np.ndarray:
    """Same-length 1-D pooling along the last axis (edges padded with the edge values)."""
    if kernel_size <= 1:
        return x
    half = kernel_size // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)], mode="edge")
    windows = sliding_window_view(padded, kernel_size, axis=-1)
    return windows.max(axis=-1) if mode == "max" else windows.mean(axis=-1)


@dataclass
class SnapKVPolicy(Policy):
    kernel_size: int = 7
    pooling: str = "max"
    name = "snapkv"
    needs = frozenset({ATTENTION})

    def __post_init__(self) -> None:
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise PolicyError(f"kernel_size must be a positive odd number (got {self.kernel_size})")
        if self.pooling not in ("max", "avg"):
            raise PolicyError(f"pooling must be 'max' or 'avg' (got {self.pooling!r})")

    def score(self, inp: ScoreInput) -> np.ndarray:
        window = layer_normalised(require(inp, "attn_window"))
        return pool1d(window, self.kernel_size, self.pooling).mean(axis=0)
