"""Compression: when one engine evicts, which observation window it scores with, and what it removes.

The engine calls :meth:`Compressor.make_room` before every decode. When the tokens to come would pass
the capacity, the policy scores the evictable cells (all but the sinks and the most recent tokens) and
the lowest-scored go, down to the budget. The observation window the scores read is the ring of the
last ``window`` query rows (:mod:`.cells`); two things keep it right at a compression:

- the window on demand: generation steps skip the attention statistics except in the last ``window``
  steps before the cache is full; when a compression comes before those rows were recorded (a new
  prompt after a generation that ended early), the last tokens are decoded again with the statistics
  on (:meth:`Compressor.record_window`);
- the prompt probe: a prompt read in chunks is compressed before its end (usually the question) has
  been read, so the prompt's last tokens are decoded ahead, right after the cached ones, and removed
  again; their attention is that compression's window (:meth:`Compressor.probe_window`; SnapKV, Li et
  al., 2024, arXiv 2404.14469: the window at the prompt's end predicts what generation attends to).

The policy only scores (:mod:`infokv_local.policies`); this module decides how many go and removes them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DecodeError
from ..policies import ATTENTION, ENTROPY, KEYS, LAYER_DIST, ScoreInput
from ..policies.selection import drop_order, keep_count, prompt_first, whole_number_drops

if TYPE_CHECKING:
    from .engine import Engine

Window = tuple[np.ndarray, np.ndarray, int]  # summed rows [n_attn, n_cells], the last row, the number of rows


class Compressor:
    """One engine's compressions. ``probe_len`` tokens of a prompt's end are read ahead before a compression
    of that prompt (0: no probe); ``window_on_demand``: generation steps record the window only when a
    compression will read it."""

    def __init__(self, engine: Engine, probe_len: int, window_on_demand: bool) -> None:
        self.engine = engine
        self.probe_len = probe_len
        self.window_on_demand = window_on_demand
        self.probe_tail: list[int] | None = None  # the tokens of a probed prompt's end; None outside one
        self.probe_left = 0  # tokens of the probed prompt not decoded yet
        self.probe_peak = 0  # cells in use with the probe's tokens cached, in the current step
        self.probes = 0
        self.unrecorded = 0  # tokens decoded last whose attention rows are not in the ring
        self.following = 0  # tokens of the prompt being read that come after the batch being decoded
        self.fresh = 0  # recorded tokens decoded since the last one without rows (counted while unrecorded > 0)
        self.window_refreshes = 0

    def reset(self) -> None:
        self.probe_tail = None
        self.probe_left = self.probe_peak = self.probes = self.unrecorded = self.fresh = 0

    # ---- before a decode ------------------------------------------------------------------------------
    def attention_needed(self, n_new: int) -> bool:
        """Whether a decode of ``n_new`` tokens must record attention rows: only when a compression may read
        them, i.e. when fewer than ``window`` cells will be free once they and the rest of the prompt being
        read (:attr:`following`) are cached. A generation step records among the last ``window`` steps
        before the cache is full; a prompt that fits with ``window`` cells to spare records nothing (the
        steps before the next compression make its window), which spares prompt reading the statistics'
        cost. Within one prompt, free cells minus the tokens still to read stay the same from batch to batch
        until a compression, so its batches either all record or none does."""
        e = self.engine
        return e.capacity - e.ctx.n_used - n_new < e.window + self.following

    def make_room(self, n_new: int) -> tuple[list[int], float, float]:
        """Compress when ``n_new`` more tokens would pass the capacity. Returns the evicted positions and the
        seconds spent scoring (with recording or probing the window) and removing."""
        e = self.engine
        if not e.policy.evicts:
            return [], 0.0, 0.0
        tail = self.probe_tail
        room = e.capacity - (self.probe_len if tail is not None else 0)
        if e.ctx.n_used + n_new <= room:
            return [], 0.0, 0.0
        record_s = 0.0
        if self.window_on_demand and self.unrecorded:
            t0 = time.perf_counter()
            self.record_window()
            record_s = time.perf_counter() - t0
        if tail is None:
            evicted, score_s, evict_s = self.compress(min(e.budget, e.capacity - n_new), n_new)
            return evicted, score_s + record_s, evict_s
        evicted, score_s, evict_s = [], 0.0, 0.0
        k = min(len(tail), self.probe_left)
        if e.ctx.n_used + k > e.capacity:
            # a prompt after a generation that filled the cache: make the probe's room with the usual window
            evicted, score_s, evict_s = self.compress(e.capacity - k, n_new)
        t0 = time.perf_counter()
        window = self.probe_window()
        probe_s = time.perf_counter() - t0
        ev2, s2, e2 = self.compress(min(e.budget, room - n_new), n_new, window)
        return evicted + ev2, score_s + s2 + record_s + probe_s, evict_s + e2

    def note_decoded(self, n: int, recorded: bool) -> None:
        """``n`` tokens were decoded, their attention rows ``recorded`` in the ring or not. :attr:`unrecorded`
        is how far back from the last token the oldest token without rows lies (0: the ring holds the last
        ``window`` tokens' rows): recorded rows close that gap only once ``window`` of them follow it, and
        :meth:`record_window` decodes the last ``min(unrecorded, window)`` tokens again."""
        if not self.window_on_demand:
            return
        if not recorded:
            self.unrecorded += n
            self.fresh = 0
        elif self.unrecorded:
            self.unrecorded += n
            self.fresh += n
            if self.fresh >= self.engine.window:
                self.unrecorded = self.fresh = 0

    # ---- the observation window -----------------------------------------------------------------------
    def probe_window(self) -> Window:
        """Decode the part of the prompt's end not read yet, right after the cached tokens, and remove it again;
        returns the observation window it gives over the cells: its own attention rows, after the rows of the
        end's tokens already read (in the ring) when the end has begun."""
        e = self.engine
        tail, left = self.probe_tail, self.probe_left
        assert tail is not None
        k = min(len(tail), left)
        ahead = tail[len(tail) - k:]
        # right after the cached tokens (llama.cpp takes a sequence's positions only consecutively)
        if e.n_past + k > e.compact_at:
            e.compact_positions()
        pos0 = e.n_past
        saved_entropy = e.ctx.last_entropy
        # a recurrent state cannot drop the probe's tokens: it is saved before and put back after
        saved_state = e.ctx.save_bounded() if not e.ctx.rolls_back else None
        e.ctx.set_attention_active(True)
        sig = e.ctx.decode(ahead, pos0, all_outputs=False)
        e.ctx.last_entropy = saved_entropy
        self.probe_peak = max(self.probe_peak, len(sig.cells))
        e.ctx.remove_cells(sig.cells[sig.cell_pos >= pos0])
        if saved_state is not None:
            e.ctx.load_bounded(saved_state)
        else:  # a sliding-window cache took them too; the cells they reused had left the window of pos0 already
            e.ctx.drop_bounded_from(pos0)
        self.probes += 1
        if sig.attn_last is None:
            raise DecodeError("the probe's decode returned no attention rows")
        rows = sig.attn_last  # [n_attn, rows, n_cells]: the last min(k, window) of the probe's rows
        n_rows = rows.shape[1]
        read = min(len(tail) - k, e.cells.ring_len, e.window - n_rows)
        return rows.sum(axis=1) + e.cells.newest_rows(read), rows[:, -1], n_rows + read

    def record_window(self) -> None:
        """Decode the last tokens whose attention rows were skipped again, with the statistics on, so the
        ring holds the observation window of the last ``window`` tokens. They come back with the same
        positions, K/V and signals; only the cells they occupy may differ."""
        e = self.engine
        k = min(self.unrecorded, e.window, len(e.tokens))
        cells, pos = e.ctx.cell_map()
        last, last_pos = cells[-k:], pos[-k:]
        if not np.array_equal(last_pos, np.arange(e.n_past - k, e.n_past)) or \
                not np.array_equal(e.cells.token[last], np.arange(len(e.tokens) - k, len(e.tokens))):
            raise DecodeError("the tokens decoded last are not all cached; cannot record their attention")
        saved_prod = e.cells.ent_prod[last].copy()
        saved_alone = e.cells.alone[last].copy()
        e.ctx.remove_cells(last)
        e.cells.forget(last)
        e.cells.drop_newest_rows(min(self.fresh, k))  # those of them recorded already would count twice
        e.ctx.set_attention_active(True)
        e.ctx.last_entropy = float(saved_prod[0])  # what produced the first of them, as before
        sig = e.ctx.decode(e.tokens[-k:], e.n_past - k, all_outputs=e.needs_outputs)
        e.absorb(sig, k, first=len(e.tokens) - k, alone=saved_alone)
        self.unrecorded = self.fresh = 0  # the gap, or the last ``window`` tokens, decoded again with rows
        self.window_refreshes += 1

    # ---- scoring and removing -------------------------------------------------------------------------
    def compress(self, target: int, n_incoming: int = 1, window: Window | None = None) -> tuple[list[int], float,
                                                                                                   float]:
        """Evict down to ``target`` cells; ``window``: the observation window to score with instead of the
        ring's, from :meth:`probe_window`."""
        e = self.engine
        t0 = time.perf_counter()
        cells, pos = e.ctx.cell_map()
        lo, hi, n_keep = keep_count(len(cells), target, e.n_sink, e.n_recent, e.policy.n_keep)
        ev_cells = cells[lo:hi]
        if n_keep >= len(ev_cells):
            return [], 0.0, 0.0
        inp = self.score_input(ev_cells, pos[lo:hi], n_keep, n_incoming)
        if window is not None and inp.attn_window is not None:
            summed, last, rows = window
            inp.attn_window, inp.attn_current, inp.window_rows = summed[:, ev_cells], last[:, ev_cells], rows
        scores = np.asarray(e.policy.score(inp), dtype=np.float64)
        if scores.shape != (len(ev_cells),):
            raise ValueError(f"policy {e.policy.name} returned {scores.shape} scores for {len(ev_cells)} tokens")
        if e.policy.keep_prompt:
            scores = prompt_first(scores, ~e.cells.alone[ev_cells])
        anchors = e.checkpoint_anchors()
        if anchors:
            scores = np.where(np.isin(pos[lo:hi], anchors), np.inf, scores)
        if e.policy.whole_numbers:
            token_ids = np.asarray(e.tokens, dtype=np.int64)[e.cells.token[cells]]
            drop = whole_number_drops(scores, n_keep, e.model.number_kinds()[token_ids], pos, lo, hi)
        else:
            drop = drop_order(scores, n_keep)
        t1 = time.perf_counter()
        drop_cells = ev_cells[drop]
        e.ctx.remove_cells(drop_cells)
        e.cells.forget(drop_cells)
        t2 = time.perf_counter()
        return pos[lo:hi][drop].tolist(), t1 - t0, t2 - t1

    def score_input(self, cells: np.ndarray, positions: np.ndarray, n_keep: int, n_incoming: int = 1,
                    rng: np.random.Generator | None = None) -> ScoreInput:
        """What the policy scores ``cells`` (at ``positions``) with."""
        e = self.engine
        needs = e.policy.needs
        c = e.cells
        inp = ScoreInput(positions=positions.astype(np.int64), n_keep=n_keep, n_incoming=n_incoming,
                         rng=e.rng if rng is None else rng, window_generated=c.window_generated(len(e.tokens)))
        if ATTENTION in needs:
            inp.attn_acc = c.attn_acc[:, cells]
            inp.attn_current = c.attn_current[:, cells]
            inp.attn_window = c.window_sum(cells)
            inp.window_rows = c.ring_len
        if ENTROPY in needs:
            inp.entropy_produced = c.ent_prod[cells]
            inp.entropy_at = c.ent_at[cells]
        if LAYER_DIST in needs:
            inp.layer_dist = c.ldist[:, cells]
        if KEYS in needs:
            inp.keys = e.ctx.read_keys(cells)
        return inp
