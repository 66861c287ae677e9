"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
arXiv 2309.17453): keep the first ``n_sink`` tokens (attention sinks, protected by the engine) and
the most recent window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Policy, ScoreInput


@dataclass
class StreamingPolicy(Policy):
    name = "streaming"

    def score(self, inp: ScoreInput) -> np.ndarray:
        return inp.positions.astype(np.float64)  # newest first
