"""R-KV (Cai, Xiao, Sun, Luo, Zhang, Wan, Li, Zhou, Chang, Gu, Dong, Anandkumar, Asi, Hu, 2025, "R-KV:
Redundancy-aware KV Cache Compression for Reasoning Models", arXiv 2505.24133): keep the tokens that are
important and not redundant. A token's score is

    Z_i = lam * I_i - (1 - lam) * R_i

with ``I`` the importance, the attention the observation window (the last queries) pays the token, pooled over
neighbouring tokens as SnapKV is here (max pooling, ``kernel_size`` 7) and normalised over the tokens, and ``R``
the redundancy: per layer and KV head, each key's mean cosine similarity to the other cached keys, softmax over
the tokens. The
paper's ``lam`` is 0.1 (its best setting, with an observation window of 8 queries and a 128-token buffer; here
the window and buffer are the engine's: ``--window``, ``--buffer``).

Departures, for llama.cpp's cache: one cell per token for every layer and head, so ``I`` and ``R`` are averaged
over heads and layers before they are mixed (the paper selects per head); the keys are the cached ones after
RoPE, read once per compression, and the similarities are taken among the evictable tokens (the sinks and the
recent tokens are kept anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PolicyError
from .base import ATTENTION, KEYS, Policy, ScoreInput, layer_normalised, require
from .key_similarity import redundancy
from .snapkv import pool1d


@dataclass
class RKVPolicy(Policy):
    lam: float = 0.1
    kernel_size: int = 7
    name = "rkv"
    needs = frozenset({ATTENTION, KEYS})

    def __post_init__(self) -> None:
        if not (isinstance(self.lam, (int, float)) and 0.0 <= self.lam <= 1.0):
            raise PolicyError(f"lam must be a number in [0, 1] (got {self.lam!r})")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise PolicyError(f"kernel_size must be a positive odd number (got {self.kernel_size})")

    def score(self, inp: ScoreInput) -> np.ndarray:
        attn = layer_normalised(pool1d(layer_normalised(require(inp, "attn_window")), self.kernel_size, "max"))
        importance = attn.mean(axis=0)
        redundant = redundancy(require(inp, "keys")).mean(axis=0)
        return self.lam * importance - (1.0 - self.lam) * redundant
