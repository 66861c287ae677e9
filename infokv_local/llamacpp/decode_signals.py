"""What one decode call yields for the eviction policies: the :class:`Signals` record."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Signals:
    """Per-call statistics of a :class:`~infokv_local.llamacpp.context.StatsContext` decode.

    Token-indexed arrays follow the call's tokens in order; cell-indexed arrays have one column per
    KV cell of the context (``n_cells``), zero for cells that were not attended.

    - ``positions`` [n_tokens]: positions of the call's tokens.
    - ``entropy_produced`` [n_tokens]: top-k entropy of the distribution that produced each token
      (the logits at the previous position; NaN for the first token of a sequence).
    - ``entropy_at`` [n_tokens]: top-k entropy of the distribution at each token (its own logits).
    - ``layer_dist`` [n_layer, n_tokens]: 1 - cos(hidden state after layer l, after the last layer).
    - ``attn_sum`` [n_layer, n_cells]: attention mass each cell received, summed over heads and over
      every query row of the call.
    - ``attn_last`` [n_layer, n_rows, n_cells]: the same for each of the last ``n_rows`` query rows.
    - ``cells``, ``cell_pos`` [n_used]: the sequence's cells and their positions after the call,
      ordered by position.
    """

    positions: np.ndarray
    entropy_produced: np.ndarray | None
    entropy_at: np.ndarray | None
    layer_dist: np.ndarray | None
    attn_sum: np.ndarray | None
    attn_last: np.ndarray | None
    cells: np.ndarray
    cell_pos: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.positions.shape[0])
