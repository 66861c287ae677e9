"""Step statistics: what each engine call did, and the counters since the last reset."""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field, replace

HISTORY_STEPS = 4096  # engine steps kept in EngineTotals.history (the most recent ones)


@dataclass(slots=True)
class StepStats:
    """What one engine call did (one prompt chunk or one decoded token).

    ``first_token`` is how many tokens the engine had read before this step (since the last reset);
    ``peak_cells`` the most cells in use during the step (above ``used_cells`` when a prompt probe's
    tokens were cached for a moment before the compression; see :class:`Engine`).
    """

    step: int
    n_tokens: int
    used_cells: int
    budget: int
    capacity: int
    kv_bytes: int
    evicted: int
    evicted_positions: list[int]
    score_s: float
    evict_s: float
    decode_s: float
    first_token: int = 0
    peak_cells: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / max(self.decode_s + self.score_s + self.evict_s, 1e-9)


@dataclass
class EngineTotals:
    """Counters since the last reset, and the most recent steps.

    ``history`` keeps the last :data:`HISTORY_STEPS` steps (a long conversation must not grow
    memory without bound); ``max_used_cells`` and :meth:`max_used_since` stay exact over every
    step, through a stack of the decreasing suffix maxima of the cells in use, which never holds
    more entries than there are distinct cell counts (at most the capacity).
    """

    steps: int = 0
    tokens: int = 0
    evictions: int = 0
    evicted_tokens: int = 0
    max_used_cells: int = 0
    score_s: float = 0.0
    evict_s: float = 0.0
    decode_s: float = 0.0
    history: deque[StepStats] = field(default_factory=lambda: deque(maxlen=HISTORY_STEPS))
    _peaks: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (step, used), used decreasing

    def record(self, st: StepStats) -> None:
        """Count one step (``st.step`` must be :attr:`steps`)."""
        self.steps += 1
        self.tokens += st.n_tokens
        self.evictions += bool(st.evicted)
        self.evicted_tokens += st.evicted
        peak = max(st.used_cells, st.peak_cells)
        self.max_used_cells = max(self.max_used_cells, peak)
        self.score_s += st.score_s
        self.evict_s += st.evict_s
        self.decode_s += st.decode_s
        self.history.append(st)
        peaks = self._peaks
        while peaks and peaks[-1][1] <= peak:
            peaks.pop()
        peaks.append((st.step, peak))

    def max_used_since(self, step: int) -> int:
        """The most cells in use after any step numbered ``step`` or later (0 if there is none)."""
        i = bisect.bisect_left(self._peaks, (step, -1))
        return self._peaks[i][1] if i < len(self._peaks) else 0

    def cell_history(self) -> list[tuple[int, int]]:
        """(tokens read so far, cells in use) before and after each step kept in :attr:`history`:
        the saw-tooth of grow-and-compress (a compression shows as a drop just before its step's tokens)."""
        points: list[tuple[int, int]] = []
        for s in self.history:
            if s.evicted:
                points.append((s.first_token, s.used_cells - s.n_tokens))
            points.append((s.first_token + s.n_tokens, s.used_cells))
        return points


def copy_totals(t: EngineTotals) -> EngineTotals:
    """A copy that shares no mutable state with ``t`` (a snapshot must not change as the engine goes on)."""
    return replace(t, history=deque(t.history, maxlen=HISTORY_STEPS), _peaks=list(t._peaks))
