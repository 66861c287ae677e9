"""A prompt read once for the generations or replays that would read it alike, and forked to the others.

Policies that record the same signals (:func:`~infokv_local.engine.policy_reading`) read a prompt into the same cells
with the same signals, so with the same cache settings one reading serves them all until the first compression
(:meth:`~infokv_local.engine.Engine.fork`). The first caller of a group reads and saves the prompt; the others wait
for it and go on from a copy. A prompt compressed while it was read (longer than budget + buffer) is read by each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Read:
    """One group's prompt: the state once read (None: it cannot be forked)."""

    left: int  # the group's callers that have not taken it yet
    done: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    state: Any = None


class PromptForks:
    """Prompts read once per group (a hashable key: the item, the budget, the policy's reading), thread-safe."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._reads: dict[Hashable, _Read] = {}

    def expect(self, keys: Iterable[Hashable]) -> None:
        """The group of every caller to come: a saved prompt is dropped once its group's last caller took it."""
        for key in keys:
            self._reads.setdefault(key, _Read(left=0)).left += 1

    def read_or_fork(self, key: Hashable, read: Callable[[], Any], fork: Callable[[Any], None]) -> bool:
        """The first caller of ``key`` runs ``read()`` (which reads the prompt and returns the state to fork, or
        None when it cannot be forked); the others wait for it and run ``fork(state)``, or read themselves when
        there is none. True when this caller forked."""
        with self._guard:
            entry = self._reads.setdefault(key, _Read(left=1))  # a caller not announced: a group of its own
            lead, entry.started = not entry.started, True
        try:
            if lead:
                try:
                    entry.state = read()
                finally:
                    entry.done.set()
                return False
            entry.done.wait()
            if entry.state is None:
                read()
                return False
            fork(entry.state)
            return True
        finally:
            with self._guard:
                entry.left -= 1
                if entry.left <= 0:
                    self._reads.pop(key, None)
