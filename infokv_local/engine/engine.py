"""The evicting engine: one sequence generated under a fixed KV-cache budget.

The engine owns its sequence's cells in llama.cpp (a :class:`~infokv_local.llamacpp.context.StatsContext` of its
own, or one sequence of a :class:`~.scheduler.SharedContext`) and the budget. It reads prompts in chunks
and generates token by token; before each decode its :class:`~.compression.Compressor` makes room, and
after it the step's signals go into the per-cell records (:mod:`.cells`) the policies score with.

Budget invariant: with an evicting policy, the number of used cells never exceeds
``budget + buffer``. Prompts are fed in chunks of at most ``buffer`` tokens; before a chunk that
would overflow, the cache is compressed to ``budget``. Decoding lets the cache grow by ``buffer``
tokens, then compresses it back to ``budget`` (the saw-tooth).
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from ..errors import (
    BudgetError,
    CacheFull,
    CacheSettingsError,
    ContextFullError,
    DecodeError,
    EmptyPromptError,
    ForkRefused,
)
from ..llamacpp.cache_types import check_cache_type
from ..llamacpp.context import StatsContext
from ..llamacpp.decode_signals import Signals
from ..llamacpp.flash_attn import FlashAttn, choose_flash_attention, context_flash_attn, label
from ..llamacpp.model import Model
from ..llamacpp.sampling import Sampler, SamplingParams
from ..policies import ATTENTION, ATTENTION_ALL_ROWS, ENTROPY, KEYS, LAYER_DIST, Policy
from ..policies.selection import evictable_span
from ..settings import DEFAULTS
from .cells import CellSignals
from .checkpoints import Checkpoint, Checkpoints
from .compression import Compressor
from .interrupts import sigint_deferred
from .scheduler import ContextNeeds, SequenceView, SharedContext
from .sizing import DEFAULT_SIGNAL_STRIDE, plan_cache
from .snapshot import EngineSnapshot
from .steps import EngineTotals, StepStats, copy_totals


def policy_reading(policy: Policy) -> tuple[object, ...]:
    """What of a policy decides the signals a prompt read leaves in the cells: whether it evicts, which signals it
    has recorded (the keys are read from the cache when scored, not recorded), the stride of the entropy and
    layer evolution and the entropy's top-k. Policies alike in these read a prompt alike (:meth:`Engine.fork`)."""
    needs = policy.needs
    outputs = bool(needs & {ENTROPY, LAYER_DIST})
    return (policy.evicts, frozenset(needs - {KEYS}), policy.signal_stride if outputs else 1,
            policy.entropy_top_k if ENTROPY in needs else None)


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
    :mod:`~infokv_local.llamacpp.cache_types`): ``budget_mib`` and ``kv_bytes`` count the quantized bytes, and a
    quantized V cache turns flash attention on (llama.cpp needs it), which H2O cannot use.
    ``flash_attn`` (True, False, or ``"split"``: on for prompts, off for one-token steps) None chooses: on a CPU by
    timing a request with each of the three, once per model,
    machine, threads, cache types and size class of the cache (:mod:`~infokv_local.llamacpp.flash_attn`, cached
    in the user cache directory: which is faster depends on the CPU and on how many cells a step attends over;
    one verdict for every engine of the class, so that they compute the same numbers; pass ``flash_attn`` to
    compare engines of different classes on one kernel), llama.cpp's ``auto`` when layers run on a GPU (there the fused
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
    On a memory with a bounded part (a sliding-window cache, a recurrent state), which cannot drop its newest
    tokens itself, every prompt read saves up to two checkpoints of that part, where it starts and before its
    last token (read alone then), keeping the newest ``max_checkpoints`` (0: none), so that :meth:`truncate`
    can go back there (:mod:`.checkpoints`).
    """

    def __init__(
        self,
        model: Model,
        policy: str | Policy = DEFAULTS.policy,
        budget: int | None = DEFAULTS.budget,
        buffer: int = DEFAULTS.buffer,
        n_sink: int = DEFAULTS.n_sink,
        n_recent: int = DEFAULTS.n_recent,
        window: int = DEFAULTS.window,
        n_batch: int = DEFAULTS.n_batch,
        n_threads: int | None = DEFAULTS.n_threads,
        seed: int = DEFAULTS.seed,
        max_context: int | None = DEFAULTS.n_ctx,
        check_invariants: bool = False,
        flash_attn: FlashAttn = DEFAULTS.flash_attn,
        compact_at: int | None = None,
        budget_mib: float | None = DEFAULTS.budget_mib,
        cache_type_k: str = DEFAULTS.cache_type_k,
        cache_type_v: str = DEFAULTS.cache_type_v,
        prompt_probe: bool = DEFAULTS.prompt_probe,
        max_checkpoints: int = DEFAULTS.max_checkpoints,
        shared: SharedContext | None = None,
    ) -> None:
        self.model = model
        if not isinstance(max_checkpoints, int) or max_checkpoints < 0:
            raise CacheSettingsError(f"max_checkpoints must be a whole number, 0 or more (got {max_checkpoints!r})")
        self.cache_type_k = check_cache_type(cache_type_k, "cache_type_k")
        self.cache_type_v = check_cache_type(cache_type_v, "cache_type_v")
        plan = plan_cache(model, policy, budget, budget_mib, buffer, n_sink, n_recent, window, n_batch, max_context,
                          compact_at, self.cache_type_k, self.cache_type_v)
        self.policy = plan.policy
        self.eviction_note = plan.eviction_note
        self.kv_bytes_per_cell = plan.kv_bytes_per_cell
        self.budget, self.buffer, self.window = plan.budget, buffer, window
        self.n_sink, self.n_recent = n_sink, n_recent
        self.capacity, self.chunk, self.max_batch = plan.capacity, plan.chunk, plan.max_batch
        self.compact_at = plan.compact_at
        needs = self.policy.needs
        self.needs_outputs = bool(needs & {ENTROPY, LAYER_DIST})
        all_rows = ATTENTION_ALL_ROWS in needs
        # attention statistics only in the steps a compression reads (see the class docstring); H2O sums all
        window_policy = ATTENTION in needs and not all_rows and self.policy.evicts
        self.ctx: StatsContext | SequenceView
        if shared is None:
            setting, self.flash_attn_reason = choose_flash_attention(
                model, all_rows, flash_attn, self.cache_type_v, n_threads, capacity=plan.capacity,
                statistics=plan.layout is None or plan.layout.grows, policy_name=self.policy.name,
                cache_type_k=self.cache_type_k, stride=DEFAULT_SIGNAL_STRIDE)
            step_fa, prompt_fa = context_flash_attn(setting)
            self.ctx = StatsContext(
                model, n_ctx=plan.n_ctx, n_batch=self.max_batch, attn=ATTENTION in needs, n_last_rows=window,
                layer_dist=LAYER_DIST in needs,
                entropy_top_k=self.policy.entropy_top_k if ENTROPY in needs else None,
                n_threads=n_threads, flash_attn=step_fa, attn_all_rows=all_rows,
                cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v,
                prompt_flash_attn=prompt_fa,
            )
            self.flash_attn = label(setting)
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
        # 0: no probe (off, or a policy that reads no observation window; on a hybrid memory the recurrent state
        # is saved before each probe and put back after). Recording the window on demand reads the last tokens
        # again, which a sliding-window cache may not allow (docs/memory.md): there it is recorded as the tokens
        # are read
        probing = prompt_probe and window_policy and (self.ctx.rolls_back or self.ctx.memory == "hybrid")
        self.compressor = Compressor(
            self, probe_len=min(window, buffer // 2) if probing else 0,
            window_on_demand=window_policy and not self.ctx.bounded)
        self._recent_holes: set[int] = set()  # recent positions evicted before a truncation made them recent
        # of the bounded part, to go back to earlier tokens (:mod:`.checkpoints`)
        self.checkpoints = Checkpoints(max_checkpoints)
        self.n_threads = self.ctx.n_threads
        self.check_invariants = check_invariants or os.environ.get("INFOKV_DEBUG") == "1"
        self.compactions = 0
        self._restored_at_step: int | None = None  # the step at which restore() left stale logits
        self._restored_logits: np.ndarray | None = None
        self.rng = np.random.default_rng(seed)
        self.shared = shared
        self.cells = CellSignals(self.ctx.n_cells, self.ctx.n_attn_layers, window)
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
        self.cells.clear()
        self.compressor.reset()
        self.n_past = 0
        self.tokens = []
        self._pending = None
        self._recent_holes = set()
        self.checkpoints.clear()
        self.totals = EngineTotals()

    # ---- state -----------------------------------------------------------------------------
    @property
    def used_cells(self) -> int:
        return self.ctx.n_used

    @property
    def pending_token(self) -> int | None:
        """The last token of :attr:`tokens` when it is not decoded yet (generation stopped at max_tokens)."""
        return self._pending

    @property
    def probe_len(self) -> int:
        """Tokens of a prompt's end read ahead before each compression of that prompt (0: no probe)."""
        return self.compressor.probe_len

    @property
    def probes(self) -> int:
        """Prompt probes read since the last reset."""
        return self.compressor.probes

    @property
    def window_refreshes(self) -> int:
        """Times the last tokens were decoded again to record the observation window (window on demand)."""
        return self.compressor.window_refreshes

    def cached_positions(self) -> np.ndarray:
        return self.ctx.cell_map()[1]

    def cached_token_indices(self) -> np.ndarray:
        """Indices into :attr:`tokens` of the tokens still in the cache, in position order."""
        cells, _ = self.ctx.cell_map()
        return self.cells.token[cells]

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
        idx = self.cells.token[cells]
        scores = np.full(n, np.nan)
        protected = np.ones(n, dtype=bool)
        lo, hi = evictable_span(n, self.n_sink, self.n_recent)
        protected[lo:hi] = False
        if self.policy.evicts and hi > lo:
            # a private generator, so that looking does not change what a random policy evicts next
            inp = self.compressor.score_input(cells[lo:hi], pos[lo:hi],
                                              n_keep=max(min(self.budget, n) - (n - (hi - lo)), 0),
                                              rng=np.random.default_rng(0))
            scores[lo:hi] = np.asarray(self.policy.score(inp), dtype=np.float64)
        return idx, scores, protected

    def truncate(self, n_tokens: int) -> bool:
        """Drop the sequence's tokens from index ``n_tokens`` on (to continue differently from there).

        Possible while all those tokens are still cached (the most recent ones always are, up to
        ``n_recent``) and, with a sliding-window cache, while that cache still holds the window before
        them; or, on a memory with a bounded part, to a point a checkpoint was taken at (:mod:`.checkpoints`:
        where a prompt started to be read, before a prompt's last token). Returns False, changing nothing,
        otherwise.
        """
        tail = self._truncated_cells(n_tokens)
        if tail is None:
            checkpoint = self._checkpoint_for(n_tokens)
            if checkpoint is None:
                return False
            self._go_back_to(checkpoint)
            return True
        self.checkpoints.drop_after(n_tokens)
        drop_pending = self._pending is not None and n_tokens < len(self.tokens)
        k = len(tail)
        with sigint_deferred():
            if drop_pending:
                self.tokens.pop()
                self._pending = None
            if k:
                # the entropy that produced the first dropped token is the one at the new last token
                first = tail[self.cells.token[tail] == n_tokens]
                self.ctx.last_entropy = float(self.cells.ent_prod[first[0]]) if len(first) else float("nan")
                self.ctx.remove_cells(tail)
                self.ctx.drop_bounded_from(self.n_past - k)
                self.cells.forget(tail)
                del self.tokens[n_tokens:]
                self.n_past -= k
                self.compressor.unrecorded = max(self.compressor.unrecorded - k, 0)
                self.compressor.fresh = max(self.compressor.fresh - k, 0)
                self._note_recent_holes()
        return True

    def can_truncate(self, n_tokens: int) -> bool:
        """Whether :meth:`truncate` to ``n_tokens`` would succeed (nothing changes)."""
        return self._truncated_cells(n_tokens) is not None or self._checkpoint_for(n_tokens) is not None

    def checkpoint_points(self) -> list[int]:
        """The token counts :meth:`truncate` can go back to through a checkpoint (besides dropping cached
        tokens), ascending."""
        return [n for n in self.checkpoints.points() if self._checkpoint_for(n) is not None]

    def _take_checkpoint(self) -> None:
        """Save the bounded part after the tokens decoded so far (a memory with one only; nothing pending)."""
        n = len(self.tokens)
        if not self.ctx.bounded or not n or self._pending is not None or self.checkpoints.has(n):
            return
        self.checkpoints.add(Checkpoint(n_tokens=n, n_past=self.n_past, bounded=self.ctx.save_bounded(),
                                        last_entropy=self.ctx.last_entropy))

    def _checkpoint_for(self, n_tokens: int) -> Checkpoint | None:
        """The checkpoint a truncation to ``n_tokens`` can go back to, if any: taken after exactly those tokens,
        and, on a hybrid memory, the growing part's newest cell left is the position right before it
        (:meth:`checkpoint_anchors`)."""
        cp = self.checkpoints.at(n_tokens)
        if cp is None or n_tokens > len(self.tokens) - (self._pending is not None):
            return None
        if self.ctx.memory == "hybrid":  # llama.cpp takes a hybrid memory's newest position from both parts
            cells, pos = self.ctx.cell_map()
            kept = pos[self.cells.token[cells] < n_tokens]
            if len(kept) and kept[-1] != cp.n_past - 1:
                return None
        return cp

    def checkpoint_anchors(self) -> list[int]:
        """Positions compressions keep whatever their scores (within the budget): on a hybrid memory, the
        token before each checkpoint, without which llama.cpp would not continue the sequence there (a
        sequence goes on at the position after the newest one that both parts hold)."""
        if self.ctx.memory != "hybrid":
            return []
        return [cp.n_past - 1 for cp in self.checkpoints.items()]

    def _go_back_to(self, cp: Checkpoint) -> None:
        """Truncate to a checkpoint: the growing part drops the later tokens' cells, the bounded part is the
        checkpoint's. On an error from llama.cpp the sequence is forgotten (the engine is then empty)."""
        n = cp.n_tokens
        with sigint_deferred():
            try:
                if self._pending is not None:
                    self.tokens.pop()
                    self._pending = None
                cells, _ = self.ctx.cell_map()
                tail = cells[self.cells.token[cells] >= n]
                if len(tail):
                    self.ctx.remove_cells(tail)
                    self.cells.forget(tail)
                self.ctx.load_bounded(cp.bounded)
            except BaseException:
                self._reset()
                raise
            self.ctx.last_entropy = cp.last_entropy
            del self.tokens[n:]
            self.n_past = cp.n_past
            self.compressor.unrecorded = self.compressor.fresh = 0
            self.checkpoints.drop_after(n)
            self._note_recent_holes()

    def _truncated_cells(self, n_tokens: int) -> np.ndarray | None:
        """The cells a truncation to ``n_tokens`` removes, or None when some of those tokens are evicted."""
        if not 0 <= n_tokens <= len(self.tokens):
            raise ValueError(f"cannot truncate {len(self.tokens)} tokens to {n_tokens}")
        n_decoded = len(self.tokens) - (self._pending is not None)
        k = max(n_decoded - n_tokens, 0)
        if not k:
            return np.empty(0, dtype=np.int32)
        cells, _ = self.ctx.cell_map()
        tail = cells[self.cells.token[cells] >= n_tokens]
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
        comp = self.compressor
        probed = comp.probe_len > 0 and not all_logits and bool(tokens)
        # checkpoints where the prompt starts and before its last token, which is then read alone
        checkpointed = self.ctx.bounded and self.checkpoints.limit > 0 and not all_logits and bool(tokens)
        if probed or checkpointed:
            self._flush_pending()  # before the probe places the prompt's end after what is cached
        if checkpointed:
            self._take_checkpoint()
        chunk = min(self.chunk, self.buffer - comp.probe_len) if probed else self.chunk
        try:
            s = 0
            while s < len(tokens):
                stop = len(tokens) - 1 if checkpointed and s < len(tokens) - 1 else len(tokens)
                if checkpointed and s == len(tokens) - 1:
                    self._take_checkpoint()
                # teacher forcing reads chunk by chunk: its logits are compared with another engine's, batch by batch
                end = min(s + chunk, len(tokens)) if all_logits else self._batch_end(stop, s, chunk, probed)
                part = tokens[s:end]
                if probed:
                    comp.probe_tail, comp.probe_left = tokens[-comp.probe_len:], len(tokens) - s
                comp.following = len(tokens) - end
                self._decode(part, all_outputs=all_logits or self.needs_outputs, logits_all=all_logits)
                yield s, (self.ctx.logits_rows(len(part)).copy() if all_logits else None)
                s += len(part)
        finally:
            comp.probe_tail = None
            comp.following = 0

    def _batch_end(self, n: int, start: int, chunk: int, probed: bool) -> int:
        """Where the batch of a prompt read from ``start`` ends: one chunk, or as many consecutive chunks as
        fit in :attr:`max_batch` tokens when none of them needs a compression (nor a renumbering of the
        positions) first. Reading them at once changes no compression point: only llama.cpp's speed (bigger
        matrix products) and the last bits of the results (llama.cpp is not batch-invariant)."""
        end = min(start + chunk, n)
        used = self.ctx.n_used + (self._pending is not None)  # a pending token is decoded first
        room = self.capacity - (self.compressor.probe_len if probed else 0)
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

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """Within the block this sequence decodes one token per call outside :meth:`generate` (teacher forcing
        with :meth:`feed`): on a shared context the other sequences' one-token steps wait for its tokens, so
        they are decoded together, as generation steps are."""
        self.ctx.set_generating(True)
        try:
            yield
        finally:
            self.ctx.set_generating(False)

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
            self.ctx.set_generating(True)  # released in the finally below (a generator may be closed early)
            for i in range(max_tokens):
                tok = self.ctx.sample(sampler)
                if (self.model.is_eog(tok) and not ignore_eos) or tok in stops:
                    return
                yield tok
                if i + 1 < max_tokens:
                    self._decode([tok], all_outputs=self.needs_outputs, step=True)
                else:
                    self.tokens.append(tok)  # part of the sequence; decoded with the next call
                    self._pending = tok
        finally:
            self.ctx.set_generating(False)
            sampler.close()

    # ---- one decode ------------------------------------------------------------------------
    def _flush_pending(self) -> None:
        """Decode the token sampled last, which generate() leaves undecoded until the sequence goes on."""
        pending = self._pending
        if pending is None:
            return
        with sigint_deferred():
            self._pending = None
            self.tokens.pop()
            try:
                self._decode([pending], all_outputs=self.needs_outputs, step=True)
            except (ContextFullError, CacheFull):  # nothing was decoded: it stays pending
                self.tokens.append(pending)
                self._pending = pending
                raise

    def _decode(self, part: list[int], all_outputs: bool, logits_all: bool = False, step: bool = False) -> None:
        """Decode one chunk, evicting first if needed: all or nothing for the engine's bookkeeping.

        SIGINT is held back until llama.cpp's cache and the engine's records agree again
        (:func:`~infokv_local.engine.interrupts.sigint_deferred`); an error before llama_decode changes nothing.
        ``step``: a sampled token, decoded with the generation steps' flash-attention setting (``"split"``).
        """
        with sigint_deferred():
            self._decode_step(part, all_outputs, logits_all, step)

    def _decode_step(self, part: list[int], all_outputs: bool, logits_all: bool = False, step: bool = False) -> None:
        self._flush_pending()
        if not self.policy.evicts and self.ctx.n_used + len(part) > self.capacity:
            raise ContextFullError(
                f"the context of {self.capacity} tokens is full ({self.ctx.n_used} used, {len(part)} more needed) "
                f"and policy {self.policy.name!r} does not evict: use an evicting policy, or a larger context"
            )
        comp = self.compressor
        comp.probe_peak = 0
        evicted, score_s, evict_s = comp.make_room(len(part))
        if self.policy.evicts and self.n_past + len(part) > self.compact_at:
            self.compact_positions()
        if comp.window_on_demand:
            self.ctx.set_attention_active(comp.attention_needed(len(part)))
        t0 = time.perf_counter()
        sig = self.ctx.decode(part, self.n_past, all_outputs=all_outputs,
                              stride=self.policy.signal_stride if self.needs_outputs else 1, logits_all=logits_all,
                              step=step)
        decode_s = time.perf_counter() - t0
        self.absorb(sig, len(part))
        self.n_past += len(part)
        self.tokens.extend(part)
        self.last_signals = sig
        used = len(sig.cells)
        st = StepStats(
            step=self.totals.steps, n_tokens=len(part), used_cells=used, budget=self.budget,
            capacity=self.capacity, kv_bytes=used * self.kv_bytes_per_cell, evicted=len(evicted),
            evicted_positions=evicted, score_s=score_s, evict_s=evict_s, decode_s=decode_s,
            first_token=self.totals.tokens, peak_cells=max(used, comp.probe_peak),
        )
        self.totals.record(st)
        if self.check_invariants:
            self._check(sig)

    def absorb(self, sig: Signals, n: int, first: int | None = None, alone: np.ndarray | None = None) -> None:
        """Take in the signals of ``n`` tokens just decoded, the tokens ``first..`` of :attr:`tokens`
        (default: the ones about to be appended); ``alone``: whether each was decoded in a batch of one
        (default: whether ``n`` is 1)."""
        if not self.ctx.has_cells:  # a recurrent state alone: nothing per token to keep
            return
        new_cells = sig.cells[-n:]
        self.cells.absorb(
            sig, new_cells, first=len(self.tokens) if first is None else first,
            alone=(n == 1) if alone is None else alone,
            layer_rows=None if sig.layer_dist is None else self.ctx.growing_rows(sig.layer_dist),
            fresh=self.shared is not None)  # another sequence held these cells before
        self.compressor.note_decoded(n, recorded=sig.attn_last is not None)

    def compact_positions(self) -> None:
        """Close the holes in the cached tokens' positions (llama.cpp's K-shift, in
        :meth:`StatsContext.compact_positions`): 0..n-1, or beside a sliding-window cache the holes below its
        window, the window shifted as one block (its holes, the recent ones among them, move with it)."""
        before = self.n_past
        self.n_past = self.ctx.compact_positions()
        self.checkpoints.clear()  # they hold the old positions
        shift = self.n_past - before
        self._recent_holes = {p + shift for p in self._recent_holes if p + shift >= 0} if self.ctx.has_window \
            else set()
        self.compactions += 1

    def _check(self, sig: Signals) -> None:
        used = self.ctx.n_used
        peak = max(used, self.compressor.probe_peak)  # the probe's tokens were cached for a moment during the step
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
        the cached tokens' K/V and positions (llama.cpp's sequence state), the per-cell records the
        policy scores with (in position order, since cell indices change on restore), the
        tokens, ``n_past``, the totals, the random generator's state and the checkpoints."""
        cells, pos = self.ctx.cell_map()
        return EngineSnapshot(
            config=self._snapshot_config(),
            reading=self.reading_config(),
            sequence=self.ctx.save_sequence(),
            cells=np.sort(cells),
            positions=pos.copy(),
            record=self.cells.take(cells),
            ring_next=self.cells.ring_next,
            ring_len=self.cells.ring_len,
            n_past=self.n_past,
            tokens=list(self.tokens),
            pending=self._pending,
            totals=copy_totals(self.totals),
            compactions=self.compactions,
            rng_state=dict(self.rng.bit_generator.state),
            last_entropy=self.ctx.last_entropy,
            logits=self.ctx.logits(-1) if self.tokens and self._pending is None else None,
            unrecorded=self.compressor.unrecorded, fresh=self.compressor.fresh,
            checkpoints=self.checkpoints.items(),
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
        self._put_back(snap)
        self.rng.bit_generator.state = snap.rng_state

    def fork(self, snap: EngineSnapshot) -> None:
        """Continue a :meth:`snapshot` of another engine's prompt with this engine's own policy: the prompt
        read once, by the snapshot's engine, serves every policy that would have read it the same way.

        Allowed when the snapshot's cache was never compressed and its engine read with this one's reading
        configuration (:meth:`reading_config`: the same budget, buffer, window, cache types and flash
        attention, and a policy that has the same signals recorded, e.g. SnapKV and R-KV, or StreamingLLM
        and KeyDiff): this engine's cells then hold exactly what reading the prompt itself would have put
        there, and it goes on as if it had (its own random generator included). Nothing is decoded.
        Raises :class:`~infokv_local.errors.ForkRefused` otherwise, before changing anything.
        """
        if snap.reading != self.reading_config():
            raise ForkRefused(f"the prompt was read with {snap.reading}, this engine reads with "
                              f"{self.reading_config()}: read the prompt instead")
        if snap.totals.evicted_tokens or snap.compactions:
            raise ForkRefused("the prompt's cache was already compressed by its reader's policy: read the prompt "
                              "instead")
        self._put_back(snap)

    def reading_config(self) -> tuple[object, ...]:
        """What decides the cells and signals a prompt leaves before its first compression: every cache
        setting, and of the policy only which signals it has recorded and how (:meth:`fork`)."""
        return (str(self.model.path), policy_reading(self.policy), self.budget, self.buffer, self.n_sink,
                self.n_recent, self.window, self.capacity, self.chunk,
                self.compressor.probe_len, self.cache_type_k, self.cache_type_v, self.flash_attn)

    def _put_back(self, snap: EngineSnapshot) -> None:
        """The snapshot's sequence, cells and counters in this engine (all but the random generator)."""
        self.reset()
        try:
            self.ctx.load_sequence(snap.sequence, snap.cells)
            cells, pos = self.ctx.cell_map()
            if not np.array_equal(pos, snap.positions):
                raise ValueError("the restored sequence's positions differ from the snapshot's")
        except BaseException:
            self.reset()
            raise
        self.cells.put(cells, snap.record)
        self.cells.ring_next, self.cells.ring_len = snap.ring_next, snap.ring_len
        self.compressor.unrecorded, self.compressor.fresh = snap.unrecorded, snap.fresh
        self.checkpoints.replace(snap.checkpoints)
        self.n_past = snap.n_past
        self.tokens = list(snap.tokens)
        self._pending = snap.pending
        self.totals = copy_totals(snap.totals)
        self.compactions = snap.compactions
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
        saved, self._restored_logits = self._restored_logits, None
        if saved is not None and self.ctx.set_last_logits(saved):
            return  # exact: sampling reads the saved logits
        # no saved logits to put back: decode the last token again (its signals are counted twice, so later
        # evictions may differ slightly from an unparked run); a recurrent state cannot forget it first
        cells, _ = self.ctx.cell_map()
        last = cells[-1:]
        if not self.ctx.rolls_back or not len(last) or self.cells.token[last[0]] != len(self.tokens) - 1:
            raise DecodeError("the restored sequence has no logits to go on from and its last token cannot be "
                              "read again")
        self.ctx.remove_cells(last)
        self.ctx.drop_bounded_from(self.n_past - 1)
        self.cells.forget(last)
        tok = self.tokens.pop()
        self.n_past -= 1
        self._decode([tok], all_outputs=self.needs_outputs)

    def _snapshot_config(self) -> tuple[object, ...]:
        return (self.policy.name, repr(self.policy), *self.reading_config())

