"""Threads that take items from one queue, for the sequences of a shared context (one thread per sequence)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def run_workers(items: Sequence[T], n: int, work: Callable[[int, T], None],
                stop: threading.Event | None = None) -> None:
    """``work(worker, item)`` for every item, on ``n`` threads (``worker`` numbers them 0..n - 1), each taking the
    next item when it is done. Returns once every item is done, or, after ``stop`` is set, once the items in
    progress end; a Ctrl-C in the calling thread sets ``stop`` (when given), waits for them and is raised. An
    exception of ``work`` ends its thread: catch it in ``work`` to go on."""
    queue = list(items)
    guard = threading.Lock()

    def run(w: int) -> None:
        while stop is None or not stop.is_set():
            with guard:
                if not queue:
                    return
                item = queue.pop(0)
            work(w, item)

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in range(n)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # a Ctrl-C reaches the calling thread between waits
    except KeyboardInterrupt:
        if stop is not None:
            stop.set()
        for t in threads:
            t.join()
        raise
