"""Slots and parking: which conversation runs in which cache, and where idle ones wait.

A slot is one :class:`~infokv_local.InfoKVLlama` (its own context of at most budget + buffer
cells) on the shared model. A conversation is known by the prompt of its last request: a request
whose prompt starts with it continues that conversation. Such a request goes to the slot holding
it; otherwise a conversation parked in the :class:`ParkingStore` is restored into a free slot (no
prefill); otherwise it starts fresh in the least recently used free slot. Whatever that slot held
is parked first (exported to RAM, least recently used dropped beyond the size limit).

The pool's book-keeping runs on the event loop only; llama.cpp work (export, import, reset) runs
in worker threads while the slot is marked busy.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread

from ..api import InfoKVLlama, SavedConversation


class QueueFull(Exception):
    """Every slot is busy and the queue is full."""


@dataclass
class Parked:
    conversation: str
    key: str
    state: SavedConversation
    parked_at: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + len(self.key)


class ParkingStore:
    """Parked conversations in RAM, least recently parked dropped first beyond ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Parked] = OrderedDict()  # by conversation id
        self.nbytes = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Parked) -> bool:
        """Park ``item``; returns False (and keeps nothing) if it alone exceeds the limit."""
        if item.nbytes > self.max_bytes:
            self.dropped += 1
            return False
        self._items[item.conversation] = item
        self.nbytes += item.nbytes
        while self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes
            self.dropped += 1
        return True

    def take(self, prompt: str) -> Parked | None:
        """Remove and return the parked conversation that ``prompt`` continues (the longest match)."""
        best = None
        for item in self._items.values():
            if prompt.startswith(item.key) and (best is None or len(item.key) > len(best.key)):
                best = item
        if best is not None:
            del self._items[best.conversation]
            self.nbytes -= best.nbytes
        return best

    def describe(self) -> list[dict[str, Any]]:
        return [{"conversation": p.conversation, "bytes": p.nbytes, "tokens": len(p.state.engine.tokens),
                 "cached_tokens": len(p.state.engine.positions), "parked_at": p.parked_at}
                for p in self._items.values()]


@dataclass
class Slot:
    id: int
    llm: InfoKVLlama
    busy: bool = False
    conversation: str | None = None
    key: str | None = None  # the prompt of the conversation's last request
    last_used: float = 0.0
    kv: dict[str, Any] = field(default_factory=dict)  # the last kv block seen (updated as chunks arrive)
    requests: int = 0


@dataclass
class Lease:
    """A slot given to one request, and how it got its conversation."""

    slot: Slot
    action: str  # "continue" (same slot), "restore" (from parking), "new"
    conversation: str


class SlotPool:
    """``slots`` InfoKVLlama instances, a queue of at most ``max_queue`` waiting requests, a parking store."""

    def __init__(self, llms: list[InfoKVLlama], max_queue: int, store: ParkingStore) -> None:
        self.slots = [Slot(i, llm, kv=llm.kv_stats()) for i, llm in enumerate(llms)]
        self.max_queue = max_queue
        self.store = store
        self.waiting = 0
        self.parked_total = 0
        self.restored_total = 0
        self._ids = itertools.count(1)
        self._cond: asyncio.Condition | None = None

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if not s.busy]

    async def acquire(self, prompt: str) -> Lease:
        """A slot for a request with this (formatted) prompt; waits in the queue, or raises QueueFull."""
        async with self.cond:
            if not self.free_slots():
                if self.waiting >= self.max_queue:
                    raise QueueFull()
                self.waiting += 1
                try:
                    await self.cond.wait_for(lambda: bool(self.free_slots()))
                finally:
                    self.waiting -= 1
            free = self.free_slots()
            same = [s for s in free if s.key is not None and prompt.startswith(s.key)]
            parked = None
            if same:
                slot = max(same, key=lambda s: len(s.key or ""))
                action = "continue"
            else:
                parked = self.store.take(prompt)
                slot = min(free, key=lambda s: (s.conversation is not None, s.last_used))
                action = "restore" if parked is not None else "new"
            slot.busy = True
            old_conv, old_key = slot.conversation, slot.key
        try:
            if action != "continue":
                if old_conv is not None and old_key is not None:
                    await self._park(slot, old_conv, old_key)
                if parked is not None:
                    try:
                        await anyio.to_thread.run_sync(slot.llm.import_state, parked.state)
                        self.restored_total += 1
                    except Exception:  # a state that no longer fits: start over, the prompt is prefilled
                        await anyio.to_thread.run_sync(slot.llm.reset)
                        action, parked = "new", None
                else:
                    await anyio.to_thread.run_sync(slot.llm.reset)
                slot.conversation = parked.conversation if parked is not None else f"conv-{next(self._ids)}"
                slot.key = None
                slot.kv = await anyio.to_thread.run_sync(slot.llm.kv_stats)
        except BaseException:
            await self.release(slot, None)
            raise
        assert slot.conversation is not None
        return Lease(slot, action, slot.conversation)

    async def _park(self, slot: Slot, conversation: str, key: str) -> None:
        try:
            state = await anyio.to_thread.run_sync(slot.llm.export_state)
        except Exception:
            return
        if self.store.put(Parked(conversation, key, state)):
            self.parked_total += 1

    async def release(self, slot: Slot, key: str | None) -> None:
        """Give the slot back; ``key`` is the prompt the conversation continues from (None: forget it)."""
        async with self.cond:
            slot.busy = False
            slot.key = key
            if key is None:
                slot.conversation = None
            slot.last_used = time.monotonic()
            slot.requests += 1
            self.cond.notify_all()

    def used_cells(self) -> int:
        return sum(int(s.kv.get("used_cells") or 0) for s in self.slots)
