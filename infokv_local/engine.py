"""The evicting engine: generation under a fixed KV-cache budget.

The engine owns the llama.cpp context (a :class:`~infokv_local.context.StatsContext`) and the
budget. It keeps, per KV cell, the signals the policies score with (accumulated attention, the
observation window's attention, entropy, layer evolution), decides when and how much to evict,
protects the sink and recent tokens, and removes the policy's lowest-scored tokens.

Budget invariant: with an evicting policy, the number of used cells never exceeds
``budget + buffer``. Prompts are fed in chunks of at most ``buffer`` tokens; before a chunk that
would overflow, the cache is compressed to ``budget``. Decoding lets the cache grow by ``buffer``
tokens, then compresses it back to ``budget`` (the saw-tooth).
"""

from __future__ import annotations

import bisect
import os
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .cache_types import check_cache_type, is_quantized, row_bytes
from .context import StatsContext, memory_layout
from .errors import BudgetError, CacheFull, CacheSettingsError, ContextFullError, DecodeError, EmptyPromptError
from .flash_attn import choose as choose_flash_attn
from .flash_attn import reference_workload
from .interrupts import sigint_deferred
from .model import Model
from .policies import ATTENTION, ATTENTION_ALL_ROWS, ENTROPY, LAYER_DIST, Policy, ScoreInput, make_policy
from .sampling import Sampler, SamplingParams
from .selection import drop_order, evictable_span, keep_count, whole_number_drops
from .shared_context import ContextNeeds, SequenceView, SharedContext
from .signals import Signals
from .threads import resolve_threads

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


class Engine:
    """Feed and generate tokens for one sequence inside a fixed KV budget.

    ``budget`` (tokens, or ``budget_mib`` MiB of KV memory) is what the cache is compressed to;
    ``buffer`` how far it may grow before the next compression. The ``n_sink`` first and
    ``n_recent`` last tokens are never evicted;
    ``window`` is the number of recent queries whose attention forms the observation window.
    ``check_invariants`` (or ``INFOKV_DEBUG=1``) verifies the budget and the protected tokens after
    every call.
    A policy whose ``signal_stride`` is k > 1 (``infokv:stride=4``) gets entropy and layer evolution
    measured on every k-th token of a prompt chunk only, interpolated in between
    (:meth:`StatsContext.decode`): llama.cpp's LM head, InfoKV's prefill overhead, then runs on 1/k of
    the prompt's rows. Generated tokens always have their own (their logits exist for sampling).
    Positions keep growing as tokens are evicted; before they would pass ``compact_at`` (default:
    the model's trained context) the kept tokens are renumbered 0..n-1 with llama.cpp's batched
    K-shift (``llama_memory_seq_add``), so RoPE never extrapolates.
    ``cache_type_k`` / ``cache_type_v`` quantize the cache (``q8_0``, ``q4_0``, ...; see
    :mod:`~infokv_local.cache_types`): ``budget_mib`` and ``kv_bytes`` count the quantized bytes, and a
    quantized V cache turns flash attention on (llama.cpp needs it), which H2O cannot use.
    ``flash_attn`` None chooses: on a CPU by timing decode steps with it on and off, once per model,
    machine, threads and cache types, at a reference size (:mod:`~infokv_local.flash_attn`, cached in the
    user cache directory: which is faster depends on the CPU; one verdict for every engine on the model, so
    that they compute the same numbers), llama.cpp's ``auto`` when layers run on a GPU (there the fused
    kernel is the fast path); :attr:`flash_attn_reason` says which and why. Policies that read only the
    observation window (SnapKV, InfoKV, TOVA) get their statistics with flash attention on or off
    (with it on, from a small softmax of the window rows next to the fused kernel); H2O needs the
    attention of every query row, which only the explicit softmax has, so it always runs with flash
    attention off.
    The observation window is computed on demand: a decode of one token builds the attention
    statistics only when it is one of the ``window`` tokens before the cache is full (the rows a
    compression reads), so that with a buffer of 128 and a window of 32 three steps in four run
    without them; batches (prompts) always have them. When a batch must compress before the
    window of the tokens decoded last was recorded (a new prompt after a generation that ended
    early), those tokens are decoded again with the statistics on first (they get the same K/V
    and signals), so the compression reads the window it would have read with statistics at
    every step.
    ``prompt_probe`` makes compressions while a prompt is read query-aware: a prompt read in chunks is
    compressed before its end (usually the question) has been read, so the observation window is the
    text just read and the compression keeps what that text attends to. With the probe, before each such
    compression the prompt's last ``probe_len = min(window, buffer // 2)`` tokens are decoded ahead, right
    after the cached tokens (llama.cpp accepts no gap in a sequence's positions), and removed again; their
    attention is the compression's observation window
    (and TOVA's last query), as when SnapKV compresses a prompt read whole (Li et al., 2024, arXiv
    2404.14469: the window at the prompt's end predicts what generation attends to). The budget
    invariant holds: a probed prompt is read in chunks of ``buffer - probe_len`` tokens and compressed when
    the next chunk would pass ``budget + buffer - probe_len`` cells, so the probe finds its cells free.
    It costs prompt compute (the probe tokens, once per compression) and applies to the policies that read
    the observation window (InfoKV, SnapKV, TOVA), to prompts (:meth:`prefill`, :meth:`generate`, and
    :meth:`feed` without ``all_logits``; teacher forcing with logits measures predictions as the text is
    read and is never probed).
    """

    def __init__(
        self,
        model: Model,
        policy: str | Policy = "infokv",
        budget: int | None = 1024,
        buffer: int = 128,
        n_sink: int = 4,
        n_recent: int = 32,
        window: int = 32,
        n_batch: int = 512,
        n_threads: int | None = None,
        seed: int = 0,
        max_context: int | None = None,
        check_invariants: bool = False,
        flash_attn: bool | None = None,
        compact_at: int | None = None,
        budget_mib: float | None = None,
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
        prompt_probe: bool = False,
        shared: SharedContext | None = None,
    ) -> None:
        self.model = model
        self.policy = make_policy(policy)
        self.cache_type_k = check_cache_type(cache_type_k, "cache_type_k")
        self.cache_type_v = check_cache_type(cache_type_v, "cache_type_v")
        # a memory with a bounded part (docs/memory.md): the bytes of both parts, measured before the context
        layout = (None if model.info.memory == "dense" else
                  memory_layout(model, n_batch if isinstance(n_batch, int) and n_batch > 0 else 512,
                                self.cache_type_k, self.cache_type_v))
        self.kv_bytes_per_cell = (layout.growing_bytes_per_cell if layout is not None else
                                  kv_bytes_per_token(model, self.cache_type_k, self.cache_type_v))
        # why eviction is off whatever the policy asked (None: it is not)
        self.eviction_note: str | None = None
        if layout is not None and not layout.grows:
            if self.policy.evicts:
                self.eviction_note = (
                    f"nothing to evict: {model.path.name} keeps no KV cache that grows with the sequence (its "
                    f"{layout.memory} memory takes {layout.bounded_bytes / 2**20:.2f} MiB however long it runs); "
                    f"the {self.policy.name} policy and its budget have nothing to do")
            self.policy = make_policy("full")
        if budget_mib is not None:
            if isinstance(budget_mib, bool) or not isinstance(budget_mib, (int, float)) or not budget_mib > 0:
                raise BudgetError(f"budget_mib must be a positive number of MiB (got {budget_mib!r})")
            bounded = layout.bounded_bytes if layout is not None else 0
            if budget_mib * 2**20 <= bounded:
                raise BudgetError(
                    f"budget_mib={budget_mib} is not above the part of {model.path.name}'s {model.info.memory} memory "
                    f"that does not grow ({bounded / 2**20:.2f} MiB): give more MiB, or a budget in tokens")
            if self.kv_bytes_per_cell:
                budget = int((budget_mib * 2**20 - bounded) // self.kv_bytes_per_cell)
                if budget < 1:
                    raise BudgetError(f"budget_mib={budget_mib} holds no token ({self.kv_bytes_per_cell} bytes "
                                      f"each" + (f", beside {bounded / 2**20:.2f} MiB that do not grow)" if bounded
                                                 else ")"))
            else:
                budget = budget if budget is not None else 1  # nothing grows: any budget holds
        if budget is None:
            raise BudgetError("give a budget in tokens (budget) or in MiB of KV memory (budget_mib)")
        sizes = {"budget": budget, "buffer": buffer, "n_sink": n_sink, "n_recent": n_recent, "window": window,
                 "n_batch": n_batch, "max_context": max_context, "compact_at": compact_at}
        for name, value in sizes.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise BudgetError(f"{name} must be a whole number of tokens (got {value!r})")
        if n_sink < 0 or n_recent < 1:
            raise BudgetError(f"n_sink must be >= 0 and n_recent >= 1 (got {n_sink}, {n_recent})")
        if buffer < 1 or window < 1 or n_batch < 1:
            raise BudgetError(f"buffer, window and n_batch must be positive (got {buffer}, {window}, {n_batch})")
        if budget is not None and budget < 1:
            raise BudgetError(f"budget must be a positive number of tokens (got {budget})")
        if max_context is not None and max_context < 1:
            raise BudgetError(f"max_context must be a positive number of tokens (got {max_context})")
        if self.policy.evicts and budget < n_sink + n_recent + 1:
            raise BudgetError(
                f"a budget of {budget} tokens cannot hold the {n_sink} sink and {n_recent} recent tokens that are "
                f"never evicted plus at least one other: use a budget of at least {n_sink + n_recent + 1}, or fewer "
                f"sinks (n_sink) or recent tokens (n_recent)"
            )
        # before any memory is allocated: a budget past the positions the model knows is refused
        self.compact_at = compact_at if compact_at is not None else model.info.n_ctx_train
        if self.policy.evicts and self.compact_at <= budget + buffer:
            raise BudgetError(
                f"budget + buffer ({budget} + {buffer} = {budget + buffer} tokens) must be below "
                + (f"compact_at ({self.compact_at})" if compact_at is not None else
                   f"the model's trained context ({self.compact_at} tokens): use a smaller budget")
            )
        self.budget = budget
        self.buffer = buffer
        self.n_sink = n_sink
        self.n_recent = n_recent
        self.window = window
        if self.policy.evicts:
            self.capacity = budget + buffer
            self.chunk = min(n_batch, buffer)
            # prompt chunks that all fit without a compression are read together, up to n_batch tokens
            n_ctx = self.capacity
            self.max_batch = min(n_batch, n_ctx)
        else:
            n_ctx = max_context or model.info.n_ctx_train
            self.capacity = n_ctx
            self.chunk = self.max_batch = n_batch
        needs = self.policy.needs
        self.needs_outputs = bool(needs & {ENTROPY, LAYER_DIST})
        all_rows = ATTENTION_ALL_ROWS in needs
        # attention statistics only in the steps a compression reads (see the class docstring); H2O sums all
        window_policy = ATTENTION in needs and not all_rows and self.policy.evicts
        self._window_on_demand = window_policy
        self.ctx: StatsContext | SequenceView
        if shared is None:
            flash_attn, self.flash_attn_reason = choose_flash_attention(
                model, all_rows, flash_attn, self.cache_type_v, n_threads, statistics=layout is None or layout.grows,
                policy_name=self.policy.name, cache_type_k=self.cache_type_k)
            self.ctx = StatsContext(
                model, n_ctx=n_ctx, n_batch=self.max_batch, attn=ATTENTION in needs, n_last_rows=window,
                layer_dist=LAYER_DIST in needs,
                entropy_top_k=self.policy.entropy_top_k if ENTROPY in needs else None,
                n_threads=n_threads, flash_attn=flash_attn, attn_all_rows=all_rows,
                cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v,
            )
            self.flash_attn = "auto" if flash_attn is None else ("on" if flash_attn else "off")
        else:
            if not self.policy.evicts:
                raise BudgetError(f"policy {self.policy.name!r} does not evict: a shared context holds sequences "
                                  f"of at most budget + buffer cells")
            choose_flash_attention(model, all_rows, flash_attn, self.cache_type_v, n_threads,
                                   policy_name=self.policy.name, check_only=True)
            self.ctx = shared.acquire(ContextNeeds(
                attn=ATTENTION in needs, layer_dist=LAYER_DIST in needs, all_rows=all_rows,
                entropy_top_k=self.policy.entropy_top_k if ENTROPY in needs else None, window=window,
                max_batch=self.max_batch, capacity=self.capacity, cache_type_k=self.cache_type_k,
                cache_type_v=self.cache_type_v, flash_attn=flash_attn))
            self.flash_attn, self.flash_attn_reason = shared.flash_attn, shared.flash_attn_reason
        swa = self.ctx.bounded_cells()
        if swa is not None and self.policy.evicts and self.compact_at <= self.capacity + swa[1] and \
                self.ctx.renumbering_refusal() is None:
            self.ctx.close()  # a shared context's sequence goes back to it
            raise BudgetError(
                f"budget + buffer ({self.capacity} tokens) and the sliding-window cache ({swa[1]} cells), which keeps "
                f"its positions when they are renumbered, must be below compact_at ({self.compact_at}): use a smaller "
                f"budget")
        if self.ctx.bounded:
            # recording the window on demand reads the last tokens again, which a sliding-window cache may
            # not allow (docs/memory.md): record it as the tokens are read
            self._window_on_demand = False
        # 0: no probe (off, or a policy that reads no observation window); see the class docstring
        # (a recurrent state cannot drop the probe's tokens again)
        self.probe_len = min(window, buffer // 2) if prompt_probe and window_policy and self.ctx.rolls_back else 0
        # the tokens of a probed prompt's end; None outside a probed feed
        self._probe_tail: list[int] | None = None
        self._recent_holes: set[int] = set()  # recent positions evicted before a truncation made them recent
        self._probe_left = 0  # tokens of the probed feed not decoded yet
        self._probe_peak = 0  # cells in use with the probe's tokens cached, in the current step
        self.probes = 0
        self._unrecorded = 0  # tokens decoded last whose attention rows are not in the ring
        self.window_refreshes = 0
        self.n_threads = self.ctx.n_threads
        self.check_invariants = check_invariants or os.environ.get("INFOKV_DEBUG") == "1"
        self.compactions = 0
        self._restored_at_step: int | None = None  # the step at which restore() left stale logits
        self.rng = np.random.default_rng(seed)
        self.shared = shared

        n_cells, n_attn = self.ctx.n_cells, self.ctx.n_attn_layers
        self._ent_prod = np.full(n_cells, np.nan, dtype=np.float32)
        self._ent_at = np.full(n_cells, np.nan, dtype=np.float32)
        # per-layer statistics: one row per layer attending over the growing part's cells (all but the
        # sliding-window layers), so that a score pairs a layer's attention with that layer's evolution
        self._ldist = np.zeros((n_attn, n_cells), dtype=np.float32)
        self._attn_acc = np.zeros((n_attn, n_cells), dtype=np.float32)
        self._attn_current = np.zeros((n_attn, n_cells), dtype=np.float32)
        self._ring = np.zeros((window, n_attn, n_cells), dtype=np.float32)
        self._ring_next = 0
        self._ring_len = 0
        self._cell_token = np.full(n_cells, -1, dtype=np.int64)  # index in self.tokens of each cell's token
        self._cell_alone = np.zeros(n_cells, dtype=bool)  # decoded in a batch of one (generated, or forced as such)

        self.n_past = 0
        self.tokens: list[int] = []
        self._pending: int | None = None  # sampled last, not yet decoded (decoded when the sequence goes on)
        self.totals = EngineTotals()
        self.last_signals: Signals | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self.ctx.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the sequence (the cache is cleared, statistics restart)."""
        with sigint_deferred():
            self._reset()

    def _reset(self) -> None:
        self.ctx.clear()
        for a in (self._attn_acc, self._attn_current, self._ring, self._ldist):
            a.fill(0)
        self._ent_prod.fill(np.nan)
        self._ent_at.fill(np.nan)
        self._cell_token.fill(-1)
        self._cell_alone.fill(False)
        self._ring_next = self._ring_len = 0
        self._unrecorded = 0
        self.n_past = 0
        self.tokens = []
        self._pending = None
        self._probe_tail = None
        self._recent_holes = set()
        self.probes = 0
        self.totals = EngineTotals()

    # ---- state -----------------------------------------------------------------------------
    @property
    def used_cells(self) -> int:
        return self.ctx.n_used

    @property
    def pending_token(self) -> int | None:
        """The last token of :attr:`tokens` when it is not decoded yet (generation stopped at max_tokens)."""
        return self._pending

    def cached_positions(self) -> np.ndarray:
        return self.ctx.cell_map()[1]

    def cached_token_indices(self) -> np.ndarray:
        """Indices into :attr:`tokens` of the tokens still in the cache, in position order."""
        cells, _ = self.ctx.cell_map()
        return self._cell_token[cells]

    def token_scores(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the policy thinks of the cached tokens now, without evicting anything.

        Returns ``(token_indices, scores, protected)`` over the cached tokens in position order:
        indices into :attr:`tokens`, the policy's score (higher = kept longer; NaN for protected
        tokens and for policies that do not evict), and whether the token is a sink or recent token.
        With the window on demand, the attention term between compressions is the last recorded
        window (taken before the previous compression and during prompts), so tokens generated since
        then show no attention yet; the next compression reads a fresh window.
        """
        cells, pos = self.ctx.cell_map()
        n = len(cells)
        idx = self._cell_token[cells]
        scores = np.full(n, np.nan)
        protected = np.ones(n, dtype=bool)
        lo, hi = self._evictable_span(n)
        protected[lo:hi] = False
        if self.policy.evicts and hi > lo:
            # a private generator, so that looking does not change what a random policy evicts next
            inp = self._score_input(cells[lo:hi], pos[lo:hi], n_keep=max(min(self.budget, n) - (n - (hi - lo)), 0))
            inp.rng = np.random.default_rng(0)
            scores[lo:hi] = np.asarray(self.policy.score(inp), dtype=np.float64)
        return idx, scores, protected

    def truncate(self, n_tokens: int) -> bool:
        """Drop the sequence's tokens from index ``n_tokens`` on (to continue differently from there).

        Possible only while all those tokens are still cached (the most recent ones always are, up
        to ``n_recent``) and, with a sliding-window cache, while that cache still holds the window
        before them; returns False, changing nothing, otherwise.
        """
        tail = self._truncated_cells(n_tokens)
        if tail is None:
            return False
        drop_pending = self._pending is not None and n_tokens < len(self.tokens)
        k = len(tail)
        with sigint_deferred():
            if drop_pending:
                self.tokens.pop()
                self._pending = None
            if k:
                # the entropy that produced the first dropped token is the one at the new last token
                first = tail[self._cell_token[tail] == n_tokens]
                self.ctx.last_entropy = float(self._ent_prod[first[0]]) if len(first) else float("nan")
                self.ctx.remove_cells(tail)
                self.ctx.drop_bounded_from(self.n_past - k)
                self._forget(tail)
                del self.tokens[n_tokens:]
                self.n_past -= k
                self._unrecorded = max(self._unrecorded - k, 0)
                self._note_recent_holes()
        return True

    def can_truncate(self, n_tokens: int) -> bool:
        """Whether :meth:`truncate` to ``n_tokens`` would succeed (nothing changes)."""
        return self._truncated_cells(n_tokens) is not None

    def _truncated_cells(self, n_tokens: int) -> np.ndarray | None:
        """The cells a truncation to ``n_tokens`` removes, or None when some of those tokens are evicted."""
        if not 0 <= n_tokens <= len(self.tokens):
            raise ValueError(f"cannot truncate {len(self.tokens)} tokens to {n_tokens}")
        n_decoded = len(self.tokens) - (self._pending is not None)
        k = max(n_decoded - n_tokens, 0)
        if not k:
            return np.empty(0, dtype=np.int32)
        cells, _ = self.ctx.cell_map()
        tail = cells[self._cell_token[cells] >= n_tokens]
        if len(tail) != k or not self.ctx.can_roll_back_to(self.n_past - k):
            return None
        return tail

    def _note_recent_holes(self) -> None:
        """After a truncation or a restore: the positions now among the most recent ``n_recent`` that were
        evicted earlier, when they were not recent (the invariant check must not count them as evicted
        while protected)."""
        _, pos = self.ctx.cell_map()
        recent = np.arange(max(self.n_past - self.n_recent, 0), self.n_past)
        self._recent_holes = set(recent[~np.isin(recent, pos)].tolist())

    # ---- feeding tokens --------------------------------------------------------------------
    def feed(self, tokens: Sequence[int],
             all_logits: bool = False) -> Generator[tuple[int, np.ndarray | None], None, None]:
        """Feed tokens (a prompt, or teacher forcing) chunk by chunk, evicting as the budget requires.

        Yields ``(start, logits)`` per batch: the batch's first index within ``tokens`` and, with
        ``all_logits``, a copy of its logits [batch, n_vocab] (else None). A batch is one chunk of at most
        ``buffer`` tokens, or, without ``all_logits``, several that all fit without a compression (up to
        ``n_batch`` tokens, :meth:`_batch_end`). The last batch's final logits stay in the context for sampling.
        """
        tokens = list(tokens)
        probed = self.probe_len > 0 and not all_logits and bool(tokens)
        if probed:
            self._flush_pending()  # before the probe places the prompt's end after what is cached
        chunk = min(self.chunk, self.buffer - self.probe_len) if probed else self.chunk
        try:
            s = 0
            while s < len(tokens):
                # teacher forcing reads chunk by chunk: its logits are compared with another engine's, batch by batch
                end = min(s + chunk, len(tokens)) if all_logits else self._batch_end(len(tokens), s, chunk, probed)
                part = tokens[s:end]
                if probed:
                    self._probe_tail, self._probe_left = tokens[-self.probe_len:], len(tokens) - s
                self._decode(part, all_outputs=all_logits or self.needs_outputs, logits_all=all_logits)
                yield s, (self.ctx.logits_rows(len(part)).copy() if all_logits else None)
                s += len(part)
        finally:
            self._probe_tail = None

    def _batch_end(self, n: int, start: int, chunk: int, probed: bool) -> int:
        """Where the batch of a prompt read from ``start`` ends: one chunk, or as many consecutive chunks as
        fit in :attr:`max_batch` tokens when none of them needs a compression (nor a renumbering of the
        positions) first. Reading them at once changes no compression point: only llama.cpp's speed (bigger
        matrix products) and the last bits of the results (llama.cpp is not batch-invariant)."""
        end = min(start + chunk, n)
        used = self.ctx.n_used + (self._pending is not None)  # a pending token is decoded first
        room = self.capacity - (self.probe_len if probed else 0)
        while end < n:
            nxt = min(end + chunk, n)
            size = nxt - start
            if size > self.max_batch or used + size > room or \
                    (self.policy.evicts and self.n_past + (self._pending is not None) + size > self.compact_at):
                break
            end = nxt
        return end

    def prefill(self, tokens: Sequence[int]) -> None:
        for _ in self.feed(tokens):
            pass

    def generate(self, prompt: Sequence[int], max_tokens: int, sampling: SamplingParams | None = None,
                 stop_tokens: Sequence[int] = (), ignore_eos: bool = False) -> Iterator[int]:
        """Prefill ``prompt`` (after what is already cached) and yield up to ``max_tokens`` sampled tokens.

        End-of-generation tokens of the vocabulary (unless ``ignore_eos``) and ``stop_tokens`` end the
        generation (they are not yielded).
        """
        sampler = Sampler(sampling or SamplingParams(), self.model.info.n_vocab)
        try:
            if prompt:
                self.prefill(prompt)
            elif not self.tokens:
                raise EmptyPromptError("nothing to continue from: the prompt is empty and no sequence is cached")
            else:
                self._flush_pending()
                self._refresh_logits()  # after restore(): the context's logits are another sequence's
            # the repetition penalties see the recent sequence, prompt included
            for t in self.tokens[-sampler.params.repeat_last_n:] if sampler.params.repeat_last_n else []:
                sampler.accept(t)
            stops = set(stop_tokens)
            self.ctx.set_generating(True)
            for i in range(max_tokens):
                tok = self.ctx.sample(sampler)
                if (self.model.is_eog(tok) and not ignore_eos) or tok in stops:
                    return
                yield tok
                if i + 1 < max_tokens:
                    self._decode([tok], all_outputs=self.needs_outputs)
                else:
                    self.tokens.append(tok)  # part of the sequence; decoded with the next call
                    self._pending = tok
        finally:
            self.ctx.set_generating(False)
            sampler.close()

    # ---- internals -------------------------------------------------------------------------
    def _flush_pending(self) -> None:
        """Decode the token sampled last, which generate() leaves undecoded until the sequence goes on."""
        pending = self._pending
        if pending is None:
            return
        with sigint_deferred():
            self._pending = None
            self.tokens.pop()
            try:
                self._decode([pending], all_outputs=self.needs_outputs)
            except (ContextFullError, CacheFull):  # nothing was decoded: it stays pending
                self.tokens.append(pending)
                self._pending = pending
                raise

    def _decode(self, part: list[int], all_outputs: bool, logits_all: bool = False) -> None:
        """Decode one chunk, evicting first if needed: all or nothing for the engine's bookkeeping.

        SIGINT is held back until llama.cpp's cache and the engine's records agree again
        (:func:`~infokv_local.interrupts.sigint_deferred`); an error before llama_decode changes nothing.
        """
        with sigint_deferred():
            self._decode_step(part, all_outputs, logits_all)

    def _decode_step(self, part: list[int], all_outputs: bool, logits_all: bool = False) -> None:
        self._flush_pending()
        if not self.policy.evicts and self.ctx.n_used + len(part) > self.capacity:
            raise ContextFullError(
                f"the context of {self.capacity} tokens is full ({self.ctx.n_used} used, {len(part)} more needed) "
                f"and policy {self.policy.name!r} does not evict: use an evicting policy, or a larger context"
            )
        self._probe_peak = 0
        evicted, score_s, evict_s = self._make_room(len(part))
        if self.policy.evicts and self.n_past + len(part) > self.compact_at:
            self._compact_positions()
        if self._window_on_demand:
            self.ctx.set_attention_active(len(part) > 1 or self.capacity - self.ctx.n_used - len(part) < self.window)
        t0 = time.perf_counter()
        sig = self.ctx.decode(part, self.n_past, all_outputs=all_outputs,
                              stride=self.policy.signal_stride if self.needs_outputs else 1, logits_all=logits_all)
        decode_s = time.perf_counter() - t0
        self._absorb(sig, len(part))
        self.n_past += len(part)
        self.tokens.extend(part)
        self.last_signals = sig
        used = len(sig.cells)
        st = StepStats(
            step=self.totals.steps, n_tokens=len(part), used_cells=used, budget=self.budget,
            capacity=self.capacity, kv_bytes=used * self.kv_bytes_per_cell, evicted=len(evicted),
            evicted_positions=evicted, score_s=score_s, evict_s=evict_s, decode_s=decode_s,
            first_token=self.totals.tokens, peak_cells=max(used, self._probe_peak),
        )
        self.totals.record(st)
        if self.check_invariants:
            self._check(sig)

    def _make_room(self, n_new: int) -> tuple[list[int], float, float]:
        if not self.policy.evicts:
            return [], 0.0, 0.0
        used = self.ctx.n_used
        tail = self._probe_tail
        room = self.capacity - (self.probe_len if tail is not None else 0)
        if used + n_new <= room:
            return [], 0.0, 0.0
        record_s = 0.0
        if self._window_on_demand and self._unrecorded:
            t0 = time.perf_counter()
            self._record_window()
            record_s = time.perf_counter() - t0
        if tail is None:
            evicted, score_s, evict_s = self._compress(min(self.budget, self.capacity - n_new), n_new)
            return evicted, score_s + record_s, evict_s
        evicted, score_s, evict_s = [], 0.0, 0.0
        k = min(len(tail), self._probe_left)
        if self.ctx.n_used + k > self.capacity:
            # a prompt after a generation that filled the cache: make the probe's room with the usual window
            evicted, score_s, evict_s = self._compress(self.capacity - k, n_new)
        t0 = time.perf_counter()
        window = self._probe_window()
        probe_s = time.perf_counter() - t0
        ev2, s2, e2 = self._compress(min(self.budget, room - n_new), n_new, window)
        return evicted + ev2, score_s + s2 + record_s + probe_s, evict_s + e2

    def _probe_window(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Decode the part of the prompt's end not read yet, right after the cached tokens, and remove it again;
        returns the observation window it gives over the cells (summed rows [n_layer, n_cells], the last
        row, the number of rows): its own attention rows, after the rows of the end's tokens already read
        (in the ring) when the end has begun."""
        tail, left = self._probe_tail, self._probe_left
        assert tail is not None
        k = min(len(tail), left)
        ahead = tail[len(tail) - k:]
        # right after the cached tokens (llama.cpp takes a sequence's positions only consecutively)
        if self.n_past + k > self.compact_at:
            self._compact_positions()
        pos0 = self.n_past
        saved_entropy = self.ctx.last_entropy
        self.ctx.set_attention_active(True)
        sig = self.ctx.decode(ahead, pos0, all_outputs=False)
        self.ctx.last_entropy = saved_entropy
        self._probe_peak = max(self._probe_peak, len(sig.cells))
        self.ctx.remove_cells(sig.cells[sig.cell_pos >= pos0])
        # a sliding-window cache took them too; the cells they reused had left the window of pos0 already
        self.ctx.drop_bounded_from(pos0)
        self.probes += 1
        if sig.attn_last is None:
            raise DecodeError("the probe's decode returned no attention rows")
        rows = sig.attn_last  # [n_layer, rows, n_cells]: the last min(k, window) of the probe's rows
        n_rows = rows.shape[1]
        window = rows.sum(axis=1)
        read = min(len(tail) - k, self._ring_len, self.window - n_rows)
        for j in range(read):  # the end's tokens already read, newest first in the ring
            window += self._ring[(self._ring_next - 1 - j) % self.window]
        return window, rows[:, -1], n_rows + read

    def _record_window(self) -> None:
        """Decode the last tokens whose attention rows were skipped again, with the statistics on, so the
        ring holds the observation window of the last ``window`` tokens. They come back with the same
        positions, K/V and signals; only the cells they occupy may differ."""
        k = min(self._unrecorded, self.window, len(self.tokens))
        cells, pos = self.ctx.cell_map()
        last, last_pos = cells[-k:], pos[-k:]
        if not np.array_equal(last_pos, np.arange(self.n_past - k, self.n_past)) or \
                not np.array_equal(self._cell_token[last], np.arange(len(self.tokens) - k, len(self.tokens))):
            raise DecodeError("the tokens decoded last are not all cached; cannot record their attention")
        saved_prod = self._ent_prod[last].copy()
        saved_alone = self._cell_alone[last].copy()
        self.ctx.remove_cells(last)
        self._forget(last)
        self.ctx.set_attention_active(True)
        self.ctx.last_entropy = float(saved_prod[0])  # what produced the first of them, as before
        sig = self.ctx.decode(self.tokens[-k:], self.n_past - k, all_outputs=self.needs_outputs)
        self._absorb(sig, k, first=len(self.tokens) - k, alone=saved_alone)
        self.window_refreshes += 1

    def _compress(self, target: int, n_incoming: int = 1,
                  window: tuple[np.ndarray, np.ndarray, int] | None = None) -> tuple[list[int], float, float]:
        """Evict down to ``target`` cells; ``window``: the observation window to score with instead of the
        ring's (summed rows, last row, number of rows, over all cells), from :meth:`_probe_window`."""
        t0 = time.perf_counter()
        cells, pos = self.ctx.cell_map()
        lo, hi, n_keep = keep_count(len(cells), target, self.n_sink, self.n_recent, self.policy.n_keep)
        ev_cells = cells[lo:hi]
        if n_keep >= len(ev_cells):
            return [], 0.0, 0.0
        inp = self._score_input(ev_cells, pos[lo:hi], n_keep, n_incoming)
        if window is not None and inp.attn_window is not None:
            summed, last, rows = window
            inp.attn_window, inp.attn_current, inp.window_rows = summed[:, ev_cells], last[:, ev_cells], rows
        scores = np.asarray(self.policy.score(inp), dtype=np.float64)
        if scores.shape != (len(ev_cells),):
            raise ValueError(f"policy {self.policy.name} returned {scores.shape} scores for {len(ev_cells)} tokens")
        if self.policy.whole_numbers:
            token_ids = np.asarray(self.tokens, dtype=np.int64)[self._cell_token[cells]]
            drop = whole_number_drops(scores, n_keep, self.model.number_kinds()[token_ids], pos, lo, hi)
        else:
            drop = drop_order(scores, n_keep)
        t1 = time.perf_counter()
        drop_cells = ev_cells[drop]
        self.ctx.remove_cells(drop_cells)
        self._forget(drop_cells)
        t2 = time.perf_counter()
        return pos[lo:hi][drop].tolist(), t1 - t0, t2 - t1

    def _evictable_span(self, n: int) -> tuple[int, int]:
        """[lo, hi) of the n cached tokens (in position order) that may be evicted: all but sinks and recent."""
        return evictable_span(n, self.n_sink, self.n_recent)

    def _compact_positions(self) -> None:
        """Close the holes in the cached tokens' positions (llama.cpp's K-shift, in
        :meth:`StatsContext.compact_positions`): 0..n-1, or beside a sliding-window cache the holes below its
        window, the window shifted as one block (its holes, the recent ones among them, move with it)."""
        before = self.n_past
        self.n_past = self.ctx.compact_positions()
        shift = self.n_past - before
        self._recent_holes = {p + shift for p in self._recent_holes if p + shift >= 0} if self.ctx.has_window \
            else set()
        self.compactions += 1

    def _score_input(self, cells: np.ndarray, positions: np.ndarray, n_keep: int, n_incoming: int = 1) -> ScoreInput:
        needs = self.policy.needs
        inp = ScoreInput(positions=positions.astype(np.int64), n_keep=n_keep, n_incoming=n_incoming, rng=self.rng,
                         window_generated=self._window_generated())
        if ATTENTION in needs:
            inp.attn_acc = self._attn_acc[:, cells]
            inp.attn_current = self._attn_current[:, cells]
            inp.attn_window = self._ring[: self._ring_len][:, :, cells].sum(axis=0)
            inp.window_rows = self._ring_len
        if ENTROPY in needs:
            inp.entropy_produced = self._ent_prod[cells]
            inp.entropy_at = self._ent_at[cells]
        if LAYER_DIST in needs:
            inp.layer_dist = self._ldist[:, cells]
        return inp

    def _window_generated(self) -> float:
        """The share of the observation window's queries (the last tokens decoded) that were decoded one at
        a time, as generation decodes: near 0 when a compression reads a prompt's end, 1 while generating."""
        # free and evicted cells hold token index -1, so the mask finds the cached window tokens alone
        recent = self._cell_token >= max(len(self.tokens) - max(self._ring_len, 1), 0)
        return float(self._cell_alone[recent].mean()) if recent.any() else 1.0

    def _absorb(self, sig: Signals, n: int, first: int | None = None, alone: np.ndarray | None = None) -> None:
        """Take in the signals of ``n`` tokens just decoded, the tokens ``first..`` of :attr:`tokens`
        (default: the ones about to be appended); ``alone``: whether each was decoded in a batch of one
        (default: whether ``n`` is 1)."""
        if not self.ctx.has_cells:  # a recurrent state alone: nothing per token to keep
            return
        new_cells = sig.cells[-n:]
        if self.shared:
            # another sequence held these cells before: this engine's sums over them are that sequence's
            self._attn_acc[:, new_cells] = 0
        first = len(self.tokens) if first is None else first
        self._cell_token[new_cells] = np.arange(first, first + n)
        self._cell_alone[new_cells] = (n == 1) if alone is None else alone
        if sig.entropy_produced is not None:
            self._ent_prod[new_cells] = sig.entropy_produced
            self._ent_at[new_cells] = sig.entropy_at
        if sig.layer_dist is not None:
            self._ldist[:, new_cells] = self.ctx.growing_rows(sig.layer_dist)
        if self._window_on_demand:
            self._unrecorded = 0 if sig.attn_last is not None else self._unrecorded + n
        if sig.attn_sum is not None and sig.attn_last is not None:
            self._attn_acc += sig.attn_sum
            for row in range(sig.attn_last.shape[1]):
                self._ring[self._ring_next] = sig.attn_last[:, row]
                self._ring_next = (self._ring_next + 1) % self.window
                self._ring_len = min(self._ring_len + 1, self.window)
            self._attn_current[:] = sig.attn_last[:, -1]

    def _forget(self, cells: np.ndarray) -> None:
        self._cell_token[cells] = -1
        self._cell_alone[cells] = False
        self._ent_prod[cells] = np.nan
        self._ent_at[cells] = np.nan
        self._ldist[:, cells] = 0
        self._attn_acc[:, cells] = 0
        self._attn_current[:, cells] = 0
        self._ring[:, :, cells] = 0

    def _check(self, sig: Signals) -> None:
        used = self.ctx.n_used
        peak = max(used, self._probe_peak)  # the probe's tokens were cached for a moment during the step
        if self.policy.evicts and peak > self.capacity:
            raise AssertionError(f"budget invariant broken: {peak} cells used > budget {self.budget} + buffer "
                                 f"{self.buffer}")
        if not self.ctx.has_cells:
            return
        cached = set(sig.cell_pos.tolist())
        protected = set(range(min(self.n_sink, self.n_past))) | set(range(max(self.n_past - self.n_recent, 0),
                                                                           self.n_past))
        missing = protected - cached - self._recent_holes
        if missing:
            raise AssertionError(f"protected positions evicted: {sorted(missing)[:10]}")
        if len(sig.cells) != used:
            raise AssertionError(f"cell map lists {len(sig.cells)} cells, llama.cpp counts {used}")

    # ---- snapshots (parking a conversation, restoring it later without prefill) -------------------
    def snapshot(self) -> EngineSnapshot:
        """Everything needed to continue this sequence later in an engine of the same configuration:
        the cached tokens' K/V and positions (llama.cpp's sequence state), the per-token signals the
        policy scores with (stored in position order, since cell indices change on restore), the
        tokens, ``n_past``, the totals and the random generator's state."""
        cells, pos = self.ctx.cell_map()
        return EngineSnapshot(
            config=self._snapshot_config(),
            sequence=self.ctx.save_sequence(),
            cells=np.sort(cells),
            positions=pos.copy(),
            cell_token=self._cell_token[cells].copy(),
            cell_alone=self._cell_alone[cells].copy(),
            ent_prod=self._ent_prod[cells].copy(),
            ent_at=self._ent_at[cells].copy(),
            ldist=self._ldist[:, cells].copy(),
            attn_acc=self._attn_acc[:, cells].copy(),
            attn_current=self._attn_current[:, cells].copy(),
            ring=self._ring[:, :, cells].copy(),
            ring_next=self._ring_next,
            ring_len=self._ring_len,
            n_past=self.n_past,
            tokens=list(self.tokens),
            pending=self._pending,
            totals=_copy_totals(self.totals),
            compactions=self.compactions,
            rng_state=dict(self.rng.bit_generator.state),
            last_entropy=self.ctx.last_entropy,
            logits=self.ctx.logits(-1) if self.tokens and self._pending is None else None,
            unrecorded=self._unrecorded,
        )

    def restore(self, snap: EngineSnapshot) -> None:
        """Continue from a :meth:`snapshot` (of this engine or another of the same configuration).

        No token is decoded: the cells come back at their old indices with their positions and
        holes (:meth:`StatsContext.load_sequence`), so the continuation is the one the engine would
        have produced without the snapshot. The last decode's logits come back too, for a call
        that brings no new token.
        Raises ValueError (the engine is then empty) if the snapshot does not fit this engine.
        """
        if snap.config != self._snapshot_config():
            raise ValueError(f"snapshot of an engine configured {snap.config}, this one is {self._snapshot_config()}")
        self.reset()
        try:
            self.ctx.load_sequence(snap.sequence, snap.cells)
            cells, pos = self.ctx.cell_map()
            if not np.array_equal(pos, snap.positions):
                raise ValueError("the restored sequence's positions differ from the snapshot's")
        except BaseException:
            self.reset()
            raise
        self._cell_token[cells] = snap.cell_token
        if snap.cell_alone is not None:
            self._cell_alone[cells] = snap.cell_alone
        self._ent_prod[cells] = snap.ent_prod
        self._ent_at[cells] = snap.ent_at
        self._ldist[:, cells] = snap.ldist
        self._attn_acc[:, cells] = snap.attn_acc
        self._attn_current[:, cells] = snap.attn_current
        self._ring[:, :, cells] = snap.ring
        self._ring_next, self._ring_len = snap.ring_next, snap.ring_len
        self._unrecorded = snap.unrecorded
        self.n_past = snap.n_past
        self.tokens = list(snap.tokens)
        self._pending = snap.pending
        self.totals = _copy_totals(snap.totals)
        self.compactions = snap.compactions
        self.rng.bit_generator.state = snap.rng_state
        self.ctx.last_entropy = snap.last_entropy
        self._restored_at_step = self.totals.steps  # logits are stale until the next decode
        self._restored_logits = snap.logits
        self._note_recent_holes()

    def _refresh_logits(self) -> None:
        """After :meth:`restore`, before sampling with no new token: the context's logits are another
        sequence's; put the snapshot's back (or, in a context that never decoded, decode the last
        token again)."""
        if self._restored_at_step != self.totals.steps or self._pending is not None:
            return
        self._restored_at_step = None
        if not self.tokens:
            return
        saved, self._restored_logits = getattr(self, "_restored_logits", None), None
        if saved is not None and self.ctx.set_last_logits(saved):
            return  # exact: sampling reads the saved logits
        # no saved logits to put back: decode the last token again (its signals are counted twice, so later
        # evictions may differ slightly from an unparked run); a recurrent state cannot forget it first
        cells, _ = self.ctx.cell_map()
        last = cells[-1:]
        if not self.ctx.rolls_back or not len(last) or self._cell_token[last[0]] != len(self.tokens) - 1:
            raise DecodeError("the restored sequence has no logits to go on from and its last token cannot be "
                              "read again")
        self.ctx.remove_cells(last)
        self.ctx.drop_bounded_from(self.n_past - 1)
        self._forget(last)
        tok = self.tokens.pop()
        self.n_past -= 1
        self._decode([tok], all_outputs=self.needs_outputs)

    def _snapshot_config(self) -> tuple[object, ...]:
        return (str(self.model.path), self.policy.name, repr(self.policy), self.budget, self.buffer, self.n_sink,
                self.n_recent, self.window, self.capacity, self.cache_type_k, self.cache_type_v, self.flash_attn)


def choose_flash_attention(model: Model, all_rows: bool, flash_attn: bool | None, cache_type_v: str,
                           n_threads: int | None, statistics: bool = True, policy_name: str = "h2o",
                           check_only: bool = False, cache_type_k: str = "f16") -> tuple[bool | None, str]:
    """The flash-attention setting of a context and why (:class:`Engine`'s docstring): as asked, forced by a
    quantized V cache (on) or by statistics over every query row (``all_rows``: off), llama.cpp's ``auto``
    on a GPU or without attention layers, else the faster one measured on this machine. Raises
    :class:`CacheSettingsError` for a combination that cannot run; ``check_only`` stops after the checks."""
    if flash_attn is not None and not isinstance(flash_attn, bool):
        raise CacheSettingsError(f"flash_attn must be True, False or None (chosen by measurement), got "
                                 f"{flash_attn!r}")
    if all_rows and flash_attn:
        raise CacheSettingsError(f"policy {policy_name!r} needs the attention of every query row, which "
                                 f"exists only with flash attention off: leave flash_attn unset or False")
    if is_quantized(cache_type_v):
        if all_rows or flash_attn is False:
            raise CacheSettingsError(
                f"a quantized V cache ({cache_type_v}) needs flash attention, and "
                + (f"policy {policy_name!r} needs it off (the attention of every query row)" if all_rows
                   else "flash_attn is False") + ": use cache_type_v='f16' or another policy")
        return True, f"on: the quantized V cache ({cache_type_v}) needs it"
    if check_only:
        return flash_attn, ""
    if flash_attn is not None:
        return flash_attn, f"{'on' if flash_attn else 'off'}: as asked (flash_attn={flash_attn})"
    if all_rows:
        return False, (f"off: policy {policy_name!r} needs the attention of every query row, which only the "
                       f"explicit softmax has")
    if model.on_gpu:
        return None, "auto: llama.cpp's choice, layers run on a GPU (where the fused kernel is fast)"
    if model.info.memory == "recurrent":
        return None, "auto: llama.cpp's choice, the model has no attention layers"
    choice = choose_flash_attn(model, reference_workload(resolve_threads(n_threads), cache_type_k, cache_type_v,
                                                         statistics=statistics))
    return choice.setting == "on", f"{choice.setting}: {choice.reason}"


def _copy_totals(t: EngineTotals) -> EngineTotals:
    """A copy that shares no mutable state with ``t`` (a snapshot must not change as the engine goes on)."""
    return replace(t, history=deque(t.history, maxlen=HISTORY_STEPS), _peaks=list(t._peaks))


def kv_bytes_per_token(model: Model, cache_type_k: str = "f16", cache_type_v: str = "f16") -> int:
    """Bytes one cached token takes in the cache a budget counts (K and V rows in the cache's data types):
    across all layers of a dense model; across the layers of the growing part of any other memory, as
    llama.cpp allocates it (0 when nothing grows)."""
    info = model.info
    if info.memory != "dense":
        return memory_layout(model, 512, cache_type_k, cache_type_v).growing_bytes_per_cell
    head_k = model.meta_int(f"{info.arch}.attention.key_length") or info.n_embd // info.n_head
    head_v = model.meta_int(f"{info.arch}.attention.value_length") or info.n_embd // info.n_head
    return info.n_layer * (row_bytes(cache_type_k, info.n_head_kv * head_k)
                           + row_bytes(cache_type_v, info.n_head_kv * head_v))


def bounded_kv_bytes(model: Model, cache_type_k: str = "f16", cache_type_v: str = "f16") -> int:
    """Bytes of the part of the model's memory that does not grow with the sequence (a sliding-window cache,
    a recurrent state), as llama.cpp allocates it for one sequence: 0 for a dense model."""
    if model.info.memory == "dense":
        return 0
    return memory_layout(model, 512, cache_type_k, cache_type_v).bounded_bytes


@dataclass
class EngineSnapshot:
    """A parked sequence (see :meth:`Engine.snapshot`); per-token arrays are in position order."""

    config: tuple[object, ...]
    sequence: bytes
    cells: np.ndarray  # the cells the sequence occupied, ascending (restored at the same indices)
    positions: np.ndarray
    cell_token: np.ndarray
    ent_prod: np.ndarray
    ent_at: np.ndarray
    ldist: np.ndarray
    attn_acc: np.ndarray
    attn_current: np.ndarray
    ring: np.ndarray
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
    unrecorded: int = 0  # tokens decoded last whose attention rows the ring lacks (window on demand)
    cell_alone: np.ndarray | None = None  # whether each token was decoded in a batch of one

    @property
    def nbytes(self) -> int:
        """Bytes this snapshot holds in RAM (the sequence state and the signal arrays)."""
        arrays = [self.positions, self.cell_token, self.ent_prod, self.ent_at, self.ldist, self.attn_acc,
                  self.attn_current, self.ring, self.logits, self.cell_alone]
        return len(self.sequence) + sum(a.nbytes for a in arrays if a is not None) + 8 * len(self.tokens)
