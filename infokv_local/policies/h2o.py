"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023, arXiv 2306.14048): keep the tokens with the largest attention accumulated over
every query since they entered the cache (the heavy hitters) and a window of recent tokens.

As in the paper, ``recent_ratio`` (0.5) of the kept tokens is the most recent ones and the rest the
heavy hitters; the engine's own ``n_recent`` protected tokens come on top. The accumulated attention of
every query row exists only in the explicit softmax: H2O runs with flash attention off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PolicyError
from .base import ATTENTION, ATTENTION_ALL_ROWS, Policy, ScoreInput, require


@dataclass
class H2OPolicy(Policy):
    recent_ratio: float = 0.5
    name = "h2o"
    needs = frozenset({ATTENTION, ATTENTION_ALL_ROWS})

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise PolicyError(f"recent_ratio must be in [0, 1] (got {self.recent_ratio})")

    def score(self, inp: ScoreInput) -> np.ndarray:
        heavy = require(inp, "attn_acc").sum(axis=0).astype(np.float64)
        n_recent = min(int(round(self.recent_ratio * inp.n_keep)), inp.n)
        if n_recent:
            newest = np.argsort(inp.positions)[inp.n - n_recent :]
            # above every heavy-hitter score, newest first
            heavy[newest] = heavy.max(initial=0.0) + 1.0 + np.arange(1, n_recent + 1)
        return heavy
