"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023, arXiv 2306.14048): keep the tokens with the largest attention accumulated over
every query since they entered the cache, plus the recent window (protected by the engine)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import ATTENTION, Policy, ScoreInput, require


@dataclass
class H2OPolicy(Policy):
    name = "h2o"
    needs = frozenset({ATTENTION})

    def score(self, inp: ScoreInput) -> np.ndarray:
        return require(inp, "attn_acc").sum(axis=0)
