"""TOVA (Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024, arXiv 2401.06104): keep the
tokens the current query attends to most (attention averaged over heads; here also over layers,
since one llama.cpp cell serves every layer)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import ATTENTION, Policy, ScoreInput, layer_normalised, require


@dataclass
class TOVAPolicy(Policy):
    name = "tova"
    needs = frozenset({ATTENTION})

    def score(self, inp: ScoreInput) -> np.ndarray:
        return layer_normalised(require(inp, "attn_current")).mean(axis=0)
