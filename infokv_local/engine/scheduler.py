"""The batch scheduler: several engines' sequences in one llama.cpp context, their steps decoded together.

A :class:`SharedContext` holds one :class:`~infokv_local.llamacpp.context.StatsContext` with ``n_seq``
sequences of ``capacity`` cells each: on a plain KV cache each sequence has a stream of cells of its own
(llama.cpp's ``kv_unified`` off, so attention is computed per sequence), on a sliding-window or hybrid
memory they share one unified cache. Every :class:`~infokv_local.engine.Engine` made on it gets a
:class:`SequenceView`: the context's per-sequence operations bound to one sequence id, with the same
names the engine uses on a context of its own, and cell indices local to the sequence's stream. Each
engine keeps its own budget, policy, signals, evictions, prompt probe and snapshots; it only ever
touches its own sequence's cells, so the budget invariant holds per sequence.

Decoding together (continuous batching, as llama-server does it): the engines run on threads of their
own (a server's requests, ``batch --parallel``). A one-token decode (a generation step) joins a group:
the first thread to arrive waits until every sequence that is generating has brought its token, or
until a short deadline, and decodes them all in one ``llama_decode``; each engine then takes its own
signals and samples from a copy of its own logits row. Prompt chunks are decoded alone, after the
waiting group, so a long prompt read in chunks never holds the other sequences back for more than a
chunk; the lock that orders all of this is first come, first served (:class:`FairRLock`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BudgetError, CacheSettingsError
from ..llamacpp.context import DecodePart, StatsContext, memory_layout
from ..llamacpp.decode_signals import Signals
from ..llamacpp.flash_attn import FlashAttn, choose_flash_attention, context_flash_attn, label
from ..llamacpp.model import Model
from ..llamacpp.sampling import Sampler
from ..policies import ATTENTION, ATTENTION_ALL_ROWS, ENTROPY, KEYS, LAYER_DIST, make_policy
from .sizing import DEFAULT_SIGNAL_STRIDE

MAX_WAIT_S = 0.010  # the longest a generation step waits for the other sequences' tokens
WAIT_SHARE = 0.25  # ... and at most this share of the last batched decode's time


class FairRLock:
    """A reentrant lock handed over in the order it was asked for (``threading.RLock`` is not fair: a
    thread that releases and asks again at once usually gets it back, so a thread reading a long prompt
    chunk after chunk would starve the others). A release hands the lock straight to the first waiting
    thread and wakes that one alone (each waiter sleeps on a gate of its own), so a busy lock costs one
    wake-up per hand-over however many threads wait: with a sequence per server slot it changes hands
    several times per generation step. Works with ``threading.Condition``."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._queue: deque[tuple[int, threading.Lock]] = deque()  # waiting threads (ident, gate), first come first
        self._owner: int | None = None
        self._count = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._count += 1
                return True
            if self._owner is None:  # nobody waits then: a release with waiters hands the lock on
                self._owner, self._count = me, 1
                return True
            if not blocking:
                return False
            gate = threading.Lock()
            gate.acquire()
            entry = (me, gate)
            self._queue.append(entry)
        if gate.acquire(timeout=timeout):  # opened by the release that made this thread the owner
            return True
        with self._mutex:
            if entry in self._queue:
                self._queue.remove(entry)
                return False
        return True  # handed over between the timeout and the check

    def release(self) -> None:
        with self._mutex:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a lock held by another thread")
            self._count -= 1
            if not self._count:
                self._hand_over()

    def _hand_over(self) -> None:
        """Make the first waiting thread the owner and wake it, or leave the lock free (``_mutex`` held)."""
        if self._queue:
            owner, gate = self._queue.popleft()
            self._owner, self._count = owner, 1
            gate.release()
        else:
            self._owner, self._count = None, 0

    def locked(self) -> bool:
        """Whether some thread holds the lock (as ``threading.Lock.locked``)."""
        return self._owner is not None

    def waiting(self) -> list[int]:
        """The idents of the threads waiting for the lock, first come first."""
        with self._mutex:
            return [ident for ident, _ in self._queue]

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    # threading.Condition's protocol for reentrant locks: wait() releases every level and restores them
    def _release_save(self) -> int:
        with self._mutex:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot wait on a lock held by another thread")
            count = self._count
            self._hand_over()
            return count

    def _acquire_restore(self, count: int) -> None:
        self.acquire()
        with self._mutex:
            self._count = count

    def _is_owned(self) -> bool:
        return self._owner == threading.get_ident()


@dataclass
class _Join:
    """A generation step waiting to be decoded with the others."""

    view: SequenceView
    part: DecodePart
    signals: Signals | None = None
    error: BaseException | None = None


@dataclass
class ContextNeeds:
    """What an engine needs of the context its sequence lives in (:meth:`SharedContext.check`)."""

    attn: bool
    layer_dist: bool
    all_rows: bool
    entropy_top_k: int | None
    window: int
    max_batch: int
    capacity: int
    cache_type_k: str
    cache_type_v: str
    flash_attn: FlashAttn = None  # what the engine was asked for (None: whatever the context runs)


class SharedContext:
    """One llama.cpp context for ``n_seq`` sequences of up to ``capacity`` cells each.

    The statistics the context collects are the union of what its engines' policies need: ``attn`` (with
    ``attn_all_rows`` when one of them is H2O, which turns flash attention off for all), ``layer_dist``;
    ``window`` and the cache types are common to every engine on it. ``flash_attn`` None: chosen as an
    engine would choose it (:func:`~infokv_local.llamacpp.flash_attn.choose_flash_attention`). Use
    :meth:`for_policies` to size one for a list of policies. ``lock`` is what orders every operation on
    the context (give the one the callers already hold around their calls, e.g. a session's lock).
    ``kv_unified`` None: a stream of cells per sequence on a plain KV cache, one unified cache on other
    memories (which llama.cpp's streams do not cover here); True or False forces one layout.
    """

    def __init__(self, model: Model, n_seq: int, capacity: int, *, attn: bool = True, layer_dist: bool = True,
                 attn_all_rows: bool = False, window: int = 32, n_batch: int = 512, n_threads: int | None = None,
                 flash_attn: FlashAttn = None, cache_type_k: str = "f16", cache_type_v: str = "f16",
                 lock: FairRLock | None = None, kv_unified: bool | None = None) -> None:
        if isinstance(n_seq, bool) or not isinstance(n_seq, int) or n_seq < 1:
            raise BudgetError(f"n_seq must be a positive whole number of sequences (got {n_seq!r})")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise BudgetError(f"capacity must be a positive whole number of cells (got {capacity!r})")
        self.model = model
        self.n_seq = n_seq
        self.capacity = capacity
        self.window = window
        if kv_unified is None:
            kv_unified = n_seq == 1 or memory_layout(model, n_batch, cache_type_k, cache_type_v).memory != "dense"
        setting, self.flash_attn_reason = choose_flash_attention(
            model, attn and attn_all_rows, flash_attn, cache_type_v, n_threads, capacity=capacity,
            statistics=attn or layer_dist, cache_type_k=cache_type_k, stride=DEFAULT_SIGNAL_STRIDE)
        step_fa, prompt_fa = context_flash_attn(setting)
        self.ctx = StatsContext(
            model, n_ctx=n_seq * capacity, n_batch=min(n_batch, n_seq * capacity), attn=attn, n_last_rows=window,
            layer_dist=layer_dist, entropy_top_k=None, n_threads=n_threads, flash_attn=step_fa,
            attn_all_rows=attn and attn_all_rows, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
            n_seq_max=n_seq, kv_unified=kv_unified, prompt_flash_attn=prompt_fa)
        self.streams = self.ctx.n_streams > 1
        self.flash_attn = label(setting)
        self.cache_type_k, self.cache_type_v = cache_type_k, cache_type_v
        self.lock = lock or FairRLock()
        self._cond = threading.Condition(self.lock)  # type: ignore[arg-type]
        self._free = list(range(n_seq))
        self._views: dict[int, SequenceView] = {}
        self._joins: list[_Join] = []
        self._since: float | None = None  # when the first waiting step arrived
        self._last_batch_s = 0.0
        self.batches = 0  # batched decodes so far, and the tokens they held
        self.batched_tokens = 0

    @classmethod
    def for_policies(cls, model: Model, n_seq: int, policies: Sequence[str | Any], capacity: int,
                     **kwargs: Any) -> SharedContext:
        """A context whose statistics cover every policy of ``policies`` (names or Policy objects)."""
        needs: set[str] = set()
        for p in policies:
            pol = make_policy(p)
            needs |= pol.needs if pol.evicts else set()
        return cls(model, n_seq, capacity, attn=ATTENTION in needs, layer_dist=LAYER_DIST in needs,
                   attn_all_rows=ATTENTION_ALL_ROWS in needs, **kwargs)

    @property
    def statistics(self) -> frozenset[str]:
        """The policy needs (:mod:`infokv_local.policies.base`) this context's statistics meet: an engine whose
        policy needs more cannot live here."""
        c = self.ctx
        return frozenset({ENTROPY} | ({ATTENTION} if c.attn else set())
                         | ({ATTENTION_ALL_ROWS} if c.attn and c.attn_all_rows else set())
                         | ({LAYER_DIST} if c.layer_dist else set())
                         | ({KEYS} if c.has_cells else set()))  # the keys are read from the cache, not collected

    @property
    def layout(self) -> str:
        """How the sequences' cells are laid out, in words."""
        return "a stream of cells per sequence" if self.streams else "one unified cache"

    # ---- sequences ---------------------------------------------------------------------------------
    def check(self, needs: ContextNeeds) -> None:
        """Raise :class:`BudgetError` (or ``CacheSettingsError``) when an engine with ``needs`` cannot live here."""
        c = self.ctx
        wrong = []
        if needs.attn and not c.attn:
            wrong.append("its policy needs attention statistics, which this context does not collect")
        if needs.all_rows and not c.attn_all_rows:
            wrong.append("its policy needs the attention of every query row (flash attention off)")
        if needs.layer_dist and not c.layer_dist:
            wrong.append("its policy needs layer evolution, which this context does not collect")
        if (needs.attn or c.attn) and needs.window != self.window:
            wrong.append(f"its window is {needs.window} queries, the context's {self.window}")
        if (needs.cache_type_k, needs.cache_type_v) != (self.cache_type_k, self.cache_type_v):
            wrong.append(f"its cache types are {needs.cache_type_k}/{needs.cache_type_v}, the context's "
                         f"{self.cache_type_k}/{self.cache_type_v}")
        if needs.flash_attn is not None and self.flash_attn != label(needs.flash_attn):
            wrong.append(f"it asks for flash attention {label(needs.flash_attn)}, the context runs it "
                         f"{self.flash_attn}")
        if wrong:
            raise CacheSettingsError("this engine cannot share the context: " + "; ".join(wrong))
        if needs.capacity > self.capacity or needs.max_batch > c.n_batch:
            raise BudgetError(f"an engine of {needs.capacity} cells (batches of {needs.max_batch}) does not fit a "
                              f"shared context of {self.capacity} cells per sequence (batches of {c.n_batch}): make "
                              f"the context for the largest budget + buffer")

    def acquire(self, needs: ContextNeeds) -> SequenceView:
        """A free sequence for an engine with ``needs`` (:class:`BudgetError` when every one is taken)."""
        self.check(needs)
        with self.lock:
            if not self._free:
                raise BudgetError(f"all {self.n_seq} sequences of the shared context are in use: close an engine "
                                  f"first")
            seq = self._free.pop(0)
            self.ctx.clear(seq)
            view = SequenceView(self, seq, needs)
            self._views[seq] = view
            return view

    def release(self, view: SequenceView) -> None:
        with self.lock:
            if self._views.get(view.seq) is view:
                del self._views[view.seq]
                if not self.ctx.closed:  # an engine closed after its context (at exit) has nothing to clear
                    self.ctx.clear(view.seq)
                self._free.append(view.seq)
                self._free.sort()
                self._cond.notify_all()

    def close(self) -> None:
        with self.lock:
            self.ctx.close()

    def __enter__(self) -> SharedContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- decoding ------------------------------------------------------------------------------------
    def decode(self, view: SequenceView, part: DecodePart) -> Signals:
        """Decode one sequence's tokens: a single token joins the other generating sequences' step, a
        batch (a prompt chunk) is decoded alone once the waiting step has run."""
        with self._cond:
            if len(part.tokens) > 1 or self._generating() <= 1:
                self._run_joins()
                return self._run([(view, part)])[0]
            join = _Join(view, part)
            self._joins.append(join)
            if self._since is None:
                self._since = time.monotonic()
            while join.signals is None and join.error is None:
                left = self._deadline() - time.monotonic()
                if len(self._joins) >= self._generating() or left <= 0:
                    self._run_joins()
                else:
                    self._cond.wait(left)
            if join.error is not None:
                raise join.error
            assert join.signals is not None
            return join.signals

    def _generating(self) -> int:
        return sum(v.generating for v in self._views.values())

    def _deadline(self) -> float:
        assert self._since is not None
        return self._since + min(MAX_WAIT_S, max(WAIT_SHARE * self._last_batch_s, 0.001))

    def _run_joins(self) -> None:
        joins, self._joins, self._since = self._joins, [], None
        if not joins:
            return
        try:
            t0 = time.perf_counter()
            signals = self._run([(j.view, j.part) for j in joins])
            self._last_batch_s = time.perf_counter() - t0
            self.batches += 1
            self.batched_tokens += len(joins)
            for j, sig in zip(joins, signals, strict=True):
                j.signals = sig
        except BaseException as e:  # nothing was decoded: every waiting step sees the error
            for j in joins:
                j.error = e
        finally:
            self._cond.notify_all()

    def _run(self, items: list[tuple[SequenceView, DecodePart]]) -> list[Signals]:
        c = self.ctx
        if c.attn:
            c.set_attention_active(any(v.wants_attn for v, _ in items))
        signals = c.decode_parts([p for _, p in items])
        for (view, part), sig in zip(items, signals, strict=True):
            if not view.wants_attn:
                sig.attn_sum = sig.attn_last = None
            if not view.needs.layer_dist:
                sig.layer_dist = None
            if self.streams:  # the sequence's own stream, in its local cell indices (views, no copies)
                lo, hi = view.base, view.base + c.n_size
                sig.cells = sig.cells - lo
                sig.attn_sum = None if sig.attn_sum is None else sig.attn_sum[:, lo:hi]
                sig.attn_last = None if sig.attn_last is None else sig.attn_last[:, :, lo:hi]
            view.rows = c.sequence_logits(view.seq) if part.logits_all else None
            view.row = view.rows[-1].copy() if view.rows is not None else c.logits(c.output_index[view.seq])
        return signals


@dataclass
class SequenceView:
    """One sequence of a :class:`SharedContext`, with the per-sequence operations of a
    :class:`~infokv_local.llamacpp.context.StatsContext` (what an engine calls on its context) bound to it. Every
    call holds the shared context's lock. Cell indices are the sequence's stream's own (0..``n_cells`` - 1)
    when each sequence has one, the unified cache's otherwise. Its last logits row is kept here (the
    context's rows belong to whichever sequence decoded last)."""

    shared: SharedContext
    seq: int
    needs: ContextNeeds
    row: np.ndarray | None = None  # this sequence's last output row
    rows: np.ndarray | None = None  # every row of its last decode that asked for all logits
    generating: bool = False  # inside a generation loop: the others' steps wait for its token
    wants_attn: bool = True

    def __post_init__(self) -> None:
        self.wants_attn = self.needs.attn

    def set_generating(self, generating: bool) -> None:
        """Whether this sequence is inside a generation loop (the others' steps wait for its tokens)."""
        with self.shared._cond:
            self.generating = generating
            self.shared._cond.notify_all()

    # what does not depend on the sequence is the context's
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.shared.ctx, name)

    @property
    def lock(self) -> FairRLock:
        return self.shared.lock

    @property
    def base(self) -> int:
        """The context's flat index of this sequence's cell 0."""
        return self.shared.ctx.stream_base(self.seq)

    @property
    def n_cells(self) -> int:
        """Cells this sequence's indices span: its stream's, or the unified cache's."""
        c = self.shared.ctx
        return c.n_size if self.shared.streams else c.n_cells

    @property
    def n_used(self) -> int:
        with self.lock:
            return self.shared.ctx.n_used_by(self.seq)

    def cell_map(self) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            cells, pos = self.shared.ctx.cell_map(self.seq)
        return (cells - self.base if self.base else cells), pos

    def remove_cells(self, cells: Sequence[int] | np.ndarray) -> int:
        arr = np.asarray(cells, dtype=np.int64)
        if self.shared.streams and len(arr) and (arr.min() < 0 or arr.max() >= self.n_cells):
            raise ValueError(f"cells {arr.tolist()[:8]}... are out of sequence {self.seq}'s {self.n_cells} cells")
        with self.lock:
            return self.shared.ctx.remove_cells(arr + self.base, self.seq)

    def read_keys(self, cells: Sequence[int] | np.ndarray) -> np.ndarray:
        """The cached keys of this sequence's ``cells`` (its own indices; see :meth:`StatsContext.read_keys`)."""
        arr = np.asarray(cells, dtype=np.int64)
        if len(arr) and (arr.min() < 0 or arr.max() >= self.n_cells):
            raise ValueError(f"cells {arr.tolist()[:8]}... are out of sequence {self.seq}'s {self.n_cells} cells")
        with self.lock:
            return self.shared.ctx.read_keys(arr + self.base)

    def compact_positions(self) -> int:
        with self.lock:
            return self.shared.ctx.compact_positions(self.seq)

    def drop_bounded_from(self, pos: int) -> None:
        with self.lock:
            self.shared.ctx.drop_bounded_from(pos, self.seq)

    def can_roll_back_to(self, pos: int) -> bool:
        with self.lock:
            return self.shared.ctx.can_roll_back_to(pos, self.seq)

    def clear(self) -> None:
        with self.lock:
            self.shared.ctx.clear(self.seq)
        self.row = self.rows = None

    @property
    def last_entropy(self) -> float:
        return self.shared.ctx.entropy_before(self.seq)

    @last_entropy.setter
    def last_entropy(self, value: float) -> None:
        self.shared.ctx.set_entropy_before(value, self.seq)

    def set_attention_active(self, active: bool) -> None:
        self.wants_attn = self.needs.attn and active

    def decode(self, tokens: Sequence[int], start_pos: int, all_outputs: bool = True, stride: int = 1,
               logits_all: bool = False, step: bool = False) -> Signals:
        part = DecodePart(self.seq, list(tokens), start_pos, all_outputs, stride, logits_all,
                          self.needs.entropy_top_k, step)
        return self.shared.decode(self, part)

    def logits(self, i: int = -1) -> np.ndarray:
        """This sequence's logits: its last output row (``i`` -1), or row ``i`` of its last all-logits decode."""
        if i == -1 and self.row is not None:
            return self.row.copy()
        if self.rows is not None and -len(self.rows) <= i < len(self.rows):
            return self.rows[i].copy()
        raise ValueError(f"no logits for output {i} of sequence {self.seq}")

    def logits_rows(self, n: int) -> np.ndarray:
        if self.rows is None or len(self.rows) < n:
            raise ValueError(f"sequence {self.seq}'s last decode kept no {n} rows of logits")
        return self.rows[:n]

    def sample(self, sampler: Sampler) -> int:
        if self.row is None:
            raise ValueError(f"sequence {self.seq} has no logits to sample from")
        return sampler.sample_row(self.row, self.shared.model)

    def set_last_logits(self, logits: np.ndarray) -> bool:
        row = np.ascontiguousarray(logits, dtype=np.float32)
        if row.shape != (self.shared.ctx.n_vocab,):
            raise ValueError(f"logits of shape {row.shape}, expected ({self.shared.ctx.n_vocab},)")
        self.row = row.copy()
        return True

    def save_sequence(self) -> bytes:
        with self.lock:
            return self.shared.ctx.save_sequence(self.seq)

    def load_sequence(self, data: bytes, cells: np.ndarray | None = None) -> None:
        flat = None if cells is None else np.asarray(cells, dtype=np.int64) + self.base
        with self.lock:
            self.shared.ctx.load_sequence(data, flat, self.seq)
        self.row = self.rows = None

    def save_bounded(self) -> bytes:
        with self.lock:
            return self.shared.ctx.save_bounded(self.seq)

    def load_bounded(self, data: bytes) -> None:
        with self.lock:
            self.shared.ctx.load_bounded(data, self.seq)

    def close(self) -> None:
        self.shared.release(self)
