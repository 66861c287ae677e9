"""Slots and parking: which conversation runs in which cache, and where idle ones wait.

A slot is one :class:`~infokv_local.InfoKVLlama` on the shared model, holding at most budget + buffer
cells: with several slots, each is a sequence of one :class:`~infokv_local.engine.SharedContext`,
so that the tokens of the slots that generate at the same time are decoded together. A request goes
where most of its prompt is cached already: to the idle slot or the parked conversation (in the
:class:`ParkingStore`) that would keep the most tokens of it
(:meth:`~infokv_local.InfoKVLlama.reusable_tokens`: the text of the prompts and answers it holds,
compared piece by piece, so two conversations that opened with the same message are told apart by
their answers). A slot whose whole conversation the prompt goes on with continues it; a prompt that
leaves it part way (a regenerated answer, another conversation with the same beginning) reuses the
common part, and the conversation the slot held is parked first so that it is not lost. A parked
conversation is restored into a free slot (no prefill). Otherwise the request starts fresh in the
least recently used free slot. Whatever a slot held before another conversation takes it is parked
(exported to RAM, least recently parked dropped beyond the size limit).

The pool's book-keeping runs on the event loop only; llama.cpp work (export, import, reset) runs
in worker threads while the slot is marked busy.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread

from ..api import InfoKVLlama, SavedConversation
from ..engine import SharedContext


class QueueFull(Exception):
    """Every slot is busy and the queue is full."""


class Abandoned(Exception):
    """The request stopped waiting for a slot: its client went away, or the server is stopping."""


@dataclass
class Parked:
    conversation: str
    state: SavedConversation
    parked_at: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return self.state.nbytes


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

    def find(self, prompt: bytes) -> tuple[Parked | None, int]:
        """The parked conversation that would keep the most tokens of ``prompt``, and how many (``(None,
        0)`` when none keeps any)."""
        best, best_n = None, 0
        for item in self._items.values():
            n = item.state.reusable_tokens(prompt)
            if n > best_n:
                best, best_n = item, n
        return best, best_n

    def remove(self, item: Parked) -> None:
        del self._items[item.conversation]
        self.nbytes -= item.nbytes

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
    last_used: float = 0.0
    kv: Mapping[str, Any] = field(default_factory=dict)  # the last kv block seen (updated as chunks arrive)
    requests: int = 0


@dataclass
class Lease:
    """A slot given to one request, and how it got its conversation."""

    slot: Slot
    action: str  # "continue" (same slot), "fork" (same slot, its conversation parked first), "restore", "new"
    conversation: str


class SlotPool:
    """``slots`` InfoKVLlama instances, a queue of at most ``max_queue`` waiting requests, a parking store."""

    def __init__(self, llms: list[InfoKVLlama], max_queue: int, store: ParkingStore,
                 shared: SharedContext | None = None) -> None:
        self.slots = [Slot(i, llm, kv=llm.kv_stats()) for i, llm in enumerate(llms)]
        self.shared = shared  # the context the slots' sequences share (None: each slot has its own)
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

    async def acquire(self, prompt: bytes, abandoned: Callable[[], bool] = lambda: False) -> Lease:
        """A slot for a request with this (formatted) prompt, as UTF-8 bytes; waits in the queue, or raises
        QueueFull. While it waits, ``abandoned`` is asked again at every :meth:`wake` and at every slot freed:
        once it is true the request leaves the queue (:class:`Abandoned`)."""
        async with self.cond:
            if abandoned():
                raise Abandoned()
            if not self.free_slots():
                if self.waiting >= self.max_queue:
                    raise QueueFull()
                self.waiting += 1
                try:
                    await self.cond.wait_for(lambda: bool(self.free_slots()) or abandoned())
                finally:
                    self.waiting -= 1
                if abandoned():
                    raise Abandoned()
            free = self.free_slots()
            kept = {s.id: s.llm.reusable_tokens(prompt) if s.conversation is not None else 0 for s in free}
            best = max(free, key=lambda s: (kept[s.id], s.last_used))
            parked, parked_kept = self.store.find(prompt)
            if kept[best.id] > 0 and kept[best.id] >= parked_kept:
                slot, parked = best, None
                whole = kept[slot.id] == slot.llm.n_tokens
                action = "continue" if whole else "fork"
            else:
                if parked is not None:
                    self.store.remove(parked)
                slot = min(free, key=lambda s: (s.conversation is not None, s.last_used))
                action = "restore" if parked is not None else "new"
            slot.busy = True
            old_conv = slot.conversation
        try:
            if action != "continue" and old_conv is not None:
                await self._park(slot, old_conv)
            if action == "fork":
                slot.conversation = f"conv-{next(self._ids)}"
            elif action != "continue":
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
                slot.kv = await anyio.to_thread.run_sync(slot.llm.kv_stats)
        except BaseException:
            await self.release(slot, keep=False)
            raise
        assert slot.conversation is not None
        return Lease(slot, action, slot.conversation)

    async def wake(self) -> None:
        """Have the waiting requests ask again whether they were abandoned."""
        async with self.cond:
            self.cond.notify_all()

    async def _park(self, slot: Slot, conversation: str) -> None:
        try:
            state = await anyio.to_thread.run_sync(slot.llm.export_state)
        except Exception:
            return
        if self.store.put(Parked(conversation, state)):
            self.parked_total += 1

    async def release(self, slot: Slot, keep: bool) -> None:
        """Give the slot back; ``keep``: the conversation it holds can be continued (False: forget it)."""
        async with self.cond:
            slot.busy = False
            if not keep:
                slot.conversation = None
            slot.last_used = time.monotonic()
            slot.requests += 1
            self.cond.notify_all()

    def used_cells(self) -> int:
        return sum(int(s.kv.get("used_cells") or 0) for s in self.slots)

    def batching(self) -> dict[str, Any]:
        """How the slots' tokens are decoded: together in one context (its layout, the generation steps decoded
        together so far and the tokens they held), or each slot alone."""
        sh = self.shared
        if sh is None:
            return {"together": False, "layout": None, "batched_steps": 0, "batched_tokens": 0}
        return {"together": True, "layout": "streams" if sh.streams else "unified", "batched_steps": sh.batches,
                "batched_tokens": sh.batched_tokens}
