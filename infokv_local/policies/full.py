"""Full cache: no eviction, the context grows with the sequence (the quality ceiling)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Policy, ScoreInput


@dataclass
class FullPolicy(Policy):
    name = "full"
    evicts = False

    def score(self, inp: ScoreInput) -> np.ndarray:
        return np.zeros(inp.n)
