"""One request's generation in a worker thread, its chunks handed to the event loop, and who may stop it.

The thread runs llama.cpp (through the slot's :class:`~infokv_local.InfoKVLlama`) so that the event loop
never blocks. Its ``cancel`` event is passed to the completion call, which checks it between prompt
chunks and tokens; a :class:`Watch` sets it when the client's connection closes or the server stops.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
from starlette.types import Receive

_DONE = object()
# how often a reply answered whole hands its chunks to the event loop (each chunk's kv block updates the
# slot's entry in /v1/kv, so that stays this fresh while it generates)
WHOLE_REPLY_HANDOVER_S = 0.25


class ClientGone(Exception):
    """The client closed its connection before its response was complete."""


class ServerStopping(Exception):
    """The server is shutting down (SIGTERM or Ctrl-C): requests still in flight are answered with an error."""


class Worker:
    """Runs one request's chunk iterator in a thread and hands the chunks to the event loop.

    Chunks are handed over in batches: the thread appends to a list and wakes the event loop only when no
    wake-up is pending already, and, with ``min_interval`` (seconds), at most that often (the last chunk
    and an error at once). Each wake-up takes a core from llama.cpp's threads in the middle of a decode on
    a machine with as many threads as cores, so a reply answered whole (nobody reads its chunks before
    the end) is handed over a few times a second instead of token by token; a stream keeps
    ``min_interval`` 0 and gets every token as soon as the loop is free."""

    def __init__(self, make: Callable[[threading.Event], Iterator[dict[str, Any]]],
                 executor: ThreadPoolExecutor, min_interval: float = 0.0) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancel = threading.Event()
        self.min_interval = min_interval
        self._pending: list[object] = []
        self._pending_lock = threading.Lock()
        self._wake_pending = False
        self._last_wake = 0.0
        self.future = self.loop.run_in_executor(executor, self._run, make)

    def _run(self, make: Callable[[threading.Event], Iterator[dict[str, Any]]]) -> None:
        try:
            chunks = make(self.cancel)
            try:
                for chunk in chunks:
                    self._post(chunk)
                    if self.cancel.is_set():
                        break
            finally:
                chunks.close()  # type: ignore[attr-defined]  # leaves the slot's cache consistent
        except BaseException as e:  # noqa: BLE001 (handed to the event loop)
            self._post(e, last=True)
        finally:
            self._post(_DONE, last=True)

    def _post(self, item: object, last: bool = False) -> None:
        with self._pending_lock:
            self._pending.append(item)
            now = time.monotonic()
            if self._wake_pending or (not last and now - self._last_wake < self.min_interval):
                return
            self._wake_pending, self._last_wake = True, now
        try:
            self.loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:  # the event loop is closed: the server stopped, nobody reads this request
            self.cancel.set()

    def _hand_over(self) -> None:
        """In the event loop: queue every chunk posted so far."""
        with self._pending_lock:
            items, self._pending, self._wake_pending = self._pending, [], False
        for item in items:
            self.queue.put_nowait(item)

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            item = await self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def stop(self) -> None:
        """Cancel (if still running) and wait for the thread to finish, even inside a cancelled scope."""
        self.cancel.set()
        with anyio.CancelScope(shield=True):
            await self.future


class Watch:
    """Watches one request's connection (from the end of its body on) and the server's stop.

    ``gone`` is set when the client disconnects, ``stopping`` (shared by every request) when the server
    shuts down; :meth:`on_end` registers what must happen then (waking the queue, cancelling the
    request's worker).
    """

    def __init__(self, receive: Receive, stopping: asyncio.Event) -> None:
        self.gone = asyncio.Event()
        self.stopping = stopping
        self._callbacks: list[Callable[[], object]] = []
        self._task = asyncio.ensure_future(self._watch(receive))
        self._stop_task = asyncio.ensure_future(self._watch_stop())

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass  # a body is read already: nothing else but the disconnect comes
        self.gone.set()
        self._fire()

    async def _watch_stop(self) -> None:
        await self.stopping.wait()
        self._fire()

    def _fire(self) -> None:
        for callback in self._callbacks:
            callback()

    @property
    def ended(self) -> bool:
        return self.gone.is_set() or self.stopping.is_set()

    def check(self) -> None:
        """Raise :class:`ClientGone` or :class:`ServerStopping` if the request should not go on."""
        if self.gone.is_set():
            raise ClientGone()
        if self.stopping.is_set():
            raise ServerStopping()

    def on_end(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` when the client goes or the server stops (at once if that happened already)."""
        self._callbacks.append(callback)
        if self.ended:
            callback()

    def close(self) -> None:
        """Stop watching (the response is complete, or the connection is no longer this request's)."""
        self._task.cancel()
        self._stop_task.cancel()
