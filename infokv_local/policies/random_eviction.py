"""Random eviction: the sanity floor every real policy must beat."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Policy, ScoreInput


@dataclass
class RandomPolicy(Policy):
    name = "random"

    def score(self, inp: ScoreInput) -> np.ndarray:
        rng = inp.rng if inp.rng is not None else np.random.default_rng()
        return rng.random(inp.n)
