"""llama.cpp's context shift (``--keep`` / ``n_discard = (n_past - n_keep) / 2`` in llama.cpp's
examples): when the cache is full, keep the first ``n_keep`` tokens (the engine's sinks) and drop
the older half of the rest.

Unlike llama.cpp, positions are not shifted back afterwards: the kept tokens keep their RoPE
positions and later tokens continue counting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Policy, ScoreInput


@dataclass
class ContextShiftPolicy(Policy):
    name = "context-shift"

    def score(self, inp: ScoreInput) -> np.ndarray:
        return inp.positions.astype(np.float64)

    def n_keep(self, n_evictable: int, target: int) -> int:
        # drop half of what is evictable, or more if that is what the budget needs
        return min(target, n_evictable - n_evictable // 2)
