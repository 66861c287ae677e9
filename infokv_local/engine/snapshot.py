"""A parked sequence: what :meth:`Engine.snapshot` saves and :meth:`Engine.restore` puts back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cells import CellRecord
from .checkpoints import Checkpoint
from .steps import EngineTotals


@dataclass
class EngineSnapshot:
    """Everything needed to continue a sequence later in an engine of the same configuration (``config``):
    llama.cpp's sequence state, the cells it occupied (restored at the same indices), and the per-cell records
    the policy scores with in position order (cell indices change on restore), with the engine's counters."""

    config: tuple[object, ...]
    reading: tuple[object, ...]  # how its prompt was read (:meth:`Engine.reading_config`), for a fork
    sequence: bytes
    cells: np.ndarray  # the cells the sequence occupied, ascending (restored at the same indices)
    positions: np.ndarray
    record: CellRecord  # the cells' signals, in position order
    ring_next: int
    ring_len: int
    n_past: int
    tokens: list[int]
    pending: int | None
    totals: EngineTotals
    compactions: int
    rng_state: dict[str, object]
    last_entropy: float
    logits: np.ndarray | None = None  # the last decode's logits, when the sequence goes on from them
    unrecorded: int = 0  # how far back the oldest token whose attention rows the ring lacks lies (window on demand)
    fresh: int = 0  # tokens with rows decoded since the last one without (window on demand)
    checkpoints: tuple[Checkpoint, ...] = ()  # of the bounded part (:mod:`.checkpoints`)

    @property
    def nbytes(self) -> int:
        """Bytes this snapshot holds in RAM (the sequence state, the checkpoints and the signal arrays)."""
        arrays = [self.positions, self.logits]
        return (len(self.sequence) + self.record.nbytes + sum(a.nbytes for a in arrays if a is not None)
                + 8 * len(self.tokens) + sum(len(c.bounded) for c in self.checkpoints))
