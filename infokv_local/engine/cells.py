"""A sequence's cells: which token each KV cell holds, and the signals the policies score it with.

Every per-cell array lives in :class:`CellSignals` and is listed once, in :data:`FILLS` (its value for a
free cell): clearing, forgetting evicted cells, taking cells out for a snapshot and putting them back all
go over that one list, so a new signal is added in one place. Arrays are indexed by the cell index of the
sequence's cache (its stream's own indices in a shared context), on the last axis:

- ``token``: the index in the engine's token list of the cell's token (-1: free or evicted);
- ``alone``: whether the token was decoded in a batch of one (generated, or forced as such);
- ``ent_prod`` / ``ent_at``: the top-k entropy of the distribution that produced the token / at it;
- ``ldist``: layer evolution, one row per layer attending over the growing cache [n_attn, n_cells];
- ``attn_acc``: attention received, summed over every query row recorded (H2O) [n_attn, n_cells];
- ``attn_current``: attention from the last query row (TOVA) [n_attn, n_cells];
- ``ring``: the observation window, the attention rows of the last ``window`` queries [window, n_attn, n_cells].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..llamacpp.decode_signals import Signals

FILLS: dict[str, float | int | bool] = {
    "token": -1, "alone": False, "ent_prod": np.nan, "ent_at": np.nan,
    "ldist": 0.0, "attn_acc": 0.0, "attn_current": 0.0, "ring": 0.0,
}


@dataclass
class CellRecord:
    """The per-cell arrays of some cells, in one order (a snapshot keeps them in position order)."""

    arrays: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


class CellSignals:
    """The per-cell arrays of one sequence of ``n_cells`` cells, with ``n_attn`` layers attending over them
    and an observation window of ``window`` query rows (a ring, newest at ``ring_next - 1``)."""

    def __init__(self, n_cells: int, n_attn: int, window: int) -> None:
        self.window = window
        self.token = np.full(n_cells, -1, dtype=np.int64)
        self.alone = np.zeros(n_cells, dtype=bool)
        self.ent_prod = np.full(n_cells, np.nan, dtype=np.float32)
        self.ent_at = np.full(n_cells, np.nan, dtype=np.float32)
        self.ldist = np.zeros((n_attn, n_cells), dtype=np.float32)
        self.attn_acc = np.zeros((n_attn, n_cells), dtype=np.float32)
        self.attn_current = np.zeros((n_attn, n_cells), dtype=np.float32)
        self.ring = np.zeros((window, n_attn, n_cells), dtype=np.float32)
        self.ring_next = 0
        self.ring_len = 0

    def _arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in FILLS}

    # ---- the whole sequence ----------------------------------------------------------------------
    def clear(self) -> None:
        """Every cell free, the window empty."""
        for name, arr in self._arrays().items():
            arr.fill(FILLS[name])
        self.ring_next = self.ring_len = 0

    def forget(self, cells: np.ndarray) -> None:
        """``cells`` were evicted (or removed): they hold nothing any more."""
        for name, arr in self._arrays().items():
            arr[..., cells] = FILLS[name]

    def take(self, cells: np.ndarray) -> CellRecord:
        """A copy of ``cells``' records, in the order of ``cells``."""
        return CellRecord({name: arr[..., cells].copy() for name, arr in self._arrays().items()})

    def put(self, cells: np.ndarray, record: CellRecord) -> None:
        """Give ``cells`` the records of :meth:`take` (in the same order)."""
        for name, arr in self._arrays().items():
            arr[..., cells] = record[name]

    # ---- taking in a decode's signals ---------------------------------------------------------------
    def absorb(self, sig: Signals, new_cells: np.ndarray, first: int, alone: bool | np.ndarray,
               layer_rows: np.ndarray | None, fresh: bool = False) -> None:
        """Take in the signals of the tokens just decoded into ``new_cells``, tokens ``first..`` of the
        sequence; ``layer_rows``: their layer evolution over the growing cache's layers (or None);
        ``fresh``: the cells may hold another sequence's sums (a shared context), start them at zero."""
        if fresh:
            self.attn_acc[:, new_cells] = 0
        self.token[new_cells] = np.arange(first, first + len(new_cells))
        self.alone[new_cells] = alone
        if sig.entropy_produced is not None:
            self.ent_prod[new_cells] = sig.entropy_produced
            self.ent_at[new_cells] = sig.entropy_at
        if layer_rows is not None:
            self.ldist[:, new_cells] = layer_rows
        if sig.attn_sum is not None and sig.attn_last is not None:
            self.attn_acc += sig.attn_sum
            for row in range(sig.attn_last.shape[1]):
                self.ring[self.ring_next] = sig.attn_last[:, row]
                self.ring_next = (self.ring_next + 1) % self.window
                self.ring_len = min(self.ring_len + 1, self.window)
            self.attn_current[:] = sig.attn_last[:, -1]

    # ---- the observation window ---------------------------------------------------------------------
    def drop_newest_rows(self, n: int) -> None:
        """Take the window's ``n`` newest rows out (their tokens are decoded again): the next rows written
        take their places. In a full ring they are zeroed (``ring[:ring_len]`` stays the window's rows)."""
        n = min(n, self.ring_len)
        for _ in range(n):
            self.ring_next = (self.ring_next - 1) % self.window
            self.ring[self.ring_next] = 0.0
        if self.ring_len < self.window:
            self.ring_len -= n

    def window_sum(self, cells: np.ndarray) -> np.ndarray:
        """The window's rows summed, over ``cells`` [n_attn, len(cells)]."""
        return self.ring[: self.ring_len][:, :, cells].sum(axis=0)

    def newest_rows(self, n: int) -> np.ndarray:
        """The window's ``n`` newest rows summed, over every cell [n_attn, n_cells]."""
        total = np.zeros(self.ring.shape[1:], dtype=np.float32)
        for j in range(n):
            total += self.ring[(self.ring_next - 1 - j) % self.window]
        return total

    def window_generated(self, n_tokens: int) -> float:
        """The share of the observation window's queries (the last tokens decoded, of ``n_tokens`` so far) that
        were decoded one at a time, as generation decodes: near 0 when a compression reads a prompt's end, 1
        while generating."""
        # free and evicted cells hold token index -1, so the mask finds the cached window tokens alone
        recent = self.token >= max(n_tokens - max(self.ring_len, 1), 0)
        return float(self.alone[recent].mean()) if recent.any() else 1.0
