"""Checkpoints of a memory's bounded part, so that a sequence can go back to an earlier token.

A sliding-window cache overwrites the cells of positions that left its window, and a recurrent state
sums every token read into one state: neither can drop its newest tokens the way a list of cells can
(docs/memory.md). So the engine saves the bounded part alone (``llama_state_seq_get_data_ext`` with
``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY``, as llama.cpp's server does with its context checkpoints) at
the two points a conversation most often goes back to: where a prompt starts to be read (an edited last
turn starts after it) and before a prompt's last token (a regenerated answer, or a next turn whose
template renders the previous answer differently, starts there). Going back to such a point restores
the bounded part, drops the growing part's later cells and reads on from there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Checkpoint:
    """The bounded part of a sequence's memory after its first ``n_tokens`` tokens were read."""

    n_tokens: int
    n_past: int  # the position the next token takes
    bounded: bytes  # the bounded part as llama.cpp saves it
    last_entropy: float  # the entropy of the prediction of the token after them


class Checkpoints:
    """One sequence's checkpoints, oldest first, at most ``limit`` (the oldest goes)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: list[Checkpoint] = []

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes the saved states hold in RAM."""
        return sum(len(c.bounded) for c in self._items)

    def points(self) -> list[int]:
        """The token counts a sequence can go back to through a checkpoint, ascending."""
        return sorted(c.n_tokens for c in self._items)

    def has(self, n_tokens: int) -> bool:
        return self.at(n_tokens) is not None

    def at(self, n_tokens: int) -> Checkpoint | None:
        return next((c for c in self._items if c.n_tokens == n_tokens), None)

    def add(self, checkpoint: Checkpoint) -> None:
        if not self.limit:
            return
        self._items = [c for c in self._items if c.n_tokens != checkpoint.n_tokens] + [checkpoint]
        del self._items[: max(len(self._items) - self.limit, 0)]

    def drop_after(self, n_tokens: int) -> None:
        """Forget the checkpoints of a continuation that is dropped (those after ``n_tokens`` tokens)."""
        self._items = [c for c in self._items if c.n_tokens <= n_tokens]

    def clear(self) -> None:
        self._items = []

    def items(self) -> tuple[Checkpoint, ...]:
        return tuple(self._items)

    def replace(self, items: tuple[Checkpoint, ...]) -> None:
        self._items = list(items)[-self.limit:] if self.limit else []
