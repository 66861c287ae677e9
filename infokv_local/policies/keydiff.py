"""KeyDiff (Park, Jones, Morse, Goel, Lee, Lott, 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for
Long-Context LLM Inference in Resource-Constrained Environments", arXiv 2504.15364): keep the distinctive keys.
Per layer and KV head the anchor is the mean of the unit-length keys; a token's score is minus its key's cosine
similarity to the anchor, so the keys most like the rest go first. The paper shows that distinctive keys tend
to receive high attention; no attention is read, so flash attention stays on.

llama.cpp keeps one cell per token for every layer and head (the paper and kvpress score per head), so the
score is the mean over heads and layers. The keys are the cached ones, after RoPE, read once per compression.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import KEYS, Policy, ScoreInput, require
from .key_similarity import anchor_similarity


@dataclass
class KeyDiffPolicy(Policy):
    name = "keydiff"
    needs = frozenset({KEYS})

    def score(self, inp: ScoreInput) -> np.ndarray:
        return -anchor_similarity(require(inp, "keys")).mean(axis=0)
