"""Ctrl-C that never lands half-way through a change of the KV cache and its bookkeeping.

Python runs its SIGINT handler (which raises :class:`KeyboardInterrupt`) between two bytecodes of
the main thread: right after ``llama_decode`` returns, say, when llama.cpp already holds the new
cells but the engine has not recorded them yet. The next decode then starts at a position llama.cpp
already has ("inconsistent sequence positions") and the conversation is lost.
:func:`sigint_deferred` holds SIGINT back for the length of such a change (a decode and its
bookkeeping, an eviction, a truncation) and delivers it right after, to the handler that was in
place: the interrupt still stops the generation, between two steps instead of inside one.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_depth = [0]  # nesting of sigint_deferred() in the main thread (only the outermost one installs the handler)


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Run the block with SIGINT held back; a SIGINT that arrived meanwhile is delivered on exit.

    Only the main thread receives signals in Python, so elsewhere this does nothing. A handler that
    is not a Python callable (``SIG_IGN``, ``SIG_DFL``, or one set from C) is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth[0]:  # nested: the outermost block holds SIGINT back already
        _depth[0] += 1
        try:
            yield
        finally:
            _depth[0] -= 1
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    caught: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    _depth[0] = 1
    try:
        yield
    finally:
        _depth[0] = 0
        signal.signal(signal.SIGINT, previous)
        if caught:
            previous(*caught[0])  # the usual handler raises KeyboardInterrupt here, after the change is complete
