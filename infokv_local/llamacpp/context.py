"""A llama.cpp context with the infokv statistics enabled, one or several sequences, and cell-level control.

:class:`StatsContext` owns the ``llama_context``: it decodes batches at explicit positions (one
sequence's tokens, or several sequences' in one ``llama_decode``: :meth:`StatsContext.decode_parts`),
collects the :class:`~infokv_local.llamacpp.decode_signals.Signals` of each sequence in a call, lists a sequence's cells
and removes cells by index. It knows nothing of budgets or policies (that is the engine's job).
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from llama_cpp import llama_cpp as llama

from ..errors import CacheFull, DecodeError, UnsupportedArchitectureError
from . import kernels
from . import library as native
from .cache_types import check_cache_type, is_quantized
from .decode_signals import Signals
from .model import Model
from .sampling import Sampler
from .threads import resolve_threads

SEQ = 0  # the sequence of a single-sequence context

# the patch's LLAMA_INFOKV_MEMORY_* (docs/memory.md): what the memory's growing and bounded parts are
MEMORY_KINDS = {0: "dense", 1: "sliding-window", 2: "hybrid", 3: "hybrid", 4: "recurrent"}
RECURRENT = 4

# CacheFull: declared in errors, re-exported
__all__ = ["SEQ", "CacheFull", "DecodePart", "MemoryLayout", "StatsContext", "memory_layout"]


@dataclass
class DecodePart:
    """One sequence's tokens in a decode call (:meth:`StatsContext.decode_parts`); the arguments are
    :meth:`StatsContext.decode`'s. ``entropy_top_k`` is this sequence's (None: no entropy)."""

    seq: int
    tokens: Sequence[int]
    start_pos: int
    all_outputs: bool = True
    stride: int = 1
    logits_all: bool = False
    entropy_top_k: int | None = None
    step: bool = False  # a generation step (a sampled token): the flash-attention setting of steps


@dataclass(frozen=True)
class MemoryLayout:
    """What a model's memory takes in a context of this engine, read from llama.cpp before the real context
    exists: bytes per cell of the growing part (the cache a budget counts), bytes of the bounded part (a
    sliding-window cache, a recurrent state: fixed at load), and whether anything grows at all."""

    memory: str
    growing_bytes_per_cell: int
    bounded_bytes: int
    grows: bool


_layouts: weakref.WeakKeyDictionary[Model, dict[tuple[int, str, str], MemoryLayout]] = weakref.WeakKeyDictionary()


def memory_layout(model: Model, n_batch: int = 512, cache_type_k: str = "f16",
                  cache_type_v: str = "f16") -> MemoryLayout:
    """The :class:`MemoryLayout` of ``model`` with these batch size and cache types (``n_batch`` sizes the
    sliding-window cache). Measured once per model and setting on a small context without statistics (the
    bounded part does not depend on the context's size)."""
    key = (n_batch, cache_type_k, cache_type_v)
    known = _layouts.setdefault(model, {})
    if key not in known:
        with StatsContext(model, n_ctx=min(256, n_batch), n_batch=n_batch, attn=False, layer_dist=False,
                          entropy_top_k=None, n_threads=1, flash_attn=is_quantized(cache_type_v),
                          cache_type_k=cache_type_k, cache_type_v=cache_type_v) as ctx:
            per_cell = ctx.growing_bytes // ctx.n_cells if ctx.n_cells else 0
            known[key] = MemoryLayout(ctx.memory, per_cell if ctx.grows else 0, ctx.bounded_bytes, ctx.grows)
    return known[key]


class StatsContext:
    """A ``llama_context`` whose decodes report InfoKV's signals, per sequence.

    ``n_seq_max`` sequences (default one) share the context. With ``kv_unified`` (the default) they share
    one array of cells: a sequence's tokens attend only to its own cells (llama.cpp's mask), so the
    attention mass a cell receives in a call comes from its own sequence's query rows alone as long as no
    cell is shared between sequences (the engine never shares them); but each sequence's query rows are
    multiplied with every sequence's cells. Without it (a plain KV cache only) every sequence has a
    stream of cells of its own (``n_cells / n_seq_max`` each, rounded up to 256 by llama.cpp), and
    attention is computed stream by stream: many sequences decoded together then cost little more than
    one. Cell indices are then flat (:meth:`stream_base`). Methods that act on a sequence take ``seq``.

    ``attn`` turns on attention statistics and ``n_last_rows`` is the observation window of recent
    query rows kept apart. With ``attn_all_rows`` the statistics also sum every query row (H2O needs
    that): only the explicit softmax has them, so flash attention is then off. Without it only the
    window is computed, and with flash attention on that is a small separate softmax of the window's
    rows over the cache next to the fused kernel (the patch's ``llama_infokv_set_stats_ext``);
    ``attn_sum`` then sums the window rows of each micro-batch. ``layer_dist`` turns on the
    layer-evolution distances and ``entropy_top_k`` the k of the restricted entropy (0 = full vocabulary; None =
    no entropy). ``n_threads`` (decode and batch threads) defaults to the physical cores, as
    llama.cpp's own tools choose (:func:`~infokv_local.llamacpp.threads.default_threads`). ``flash_attn`` None
    lets llama.cpp choose (its ``auto``) unless all-row attention statistics are on. ``prompt_flash_attn``: the
    setting of the decode calls that are not generation steps (prompts; :meth:`decode`'s ``step``), where it
    differs from ``flash_attn``'s (steps): llama.cpp keeps the cache's layout, made for ``flash_attn``, and switches
    per call (patch 11's ``llama_infokv_set_flash_attn``; with ``flash_attn`` False the fused kernel reads V
    through a copy). A prompt's token read again alone (a reused prompt's last) runs the prompt's kernel, so it
    gets the logits it got the first time.
    ``cache_type_k`` / ``cache_type_v`` are the KV cache's data types (``f16``, ``q8_0``, ``q4_0``...;
    a quantized V cache needs flash attention). Entropy and layer distances exist for the tokens a
    decode makes outputs (llama.cpp computes logits for those only): every token, every k-th
    (:meth:`decode`'s ``stride``) or the last.
    """

    def __init__(
        self,
        model: Model,
        n_ctx: int,
        n_batch: int = 512,
        attn: bool = True,
        n_last_rows: int = 32,
        layer_dist: bool = True,
        entropy_top_k: int | None = 256,
        n_threads: int | None = None,
        eval_callback: object | None = None,
        flash_attn: bool | None = None,
        attn_all_rows: bool = True,
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
        n_seq_max: int = 1,
        kv_unified: bool = True,
        prompt_flash_attn: bool | None = None,
    ) -> None:
        native.require_patched()
        if n_seq_max < 1:
            raise ValueError(f"n_seq_max must be >= 1 (got {n_seq_max})")
        if n_ctx <= 0 or n_batch <= 0:
            raise ValueError(f"n_ctx and n_batch must be positive (got {n_ctx}, {n_batch})")
        self.model = model
        self.attn = attn
        self.layer_dist = layer_dist
        self.entropy_top_k = entropy_top_k
        self.n_last_rows = n_last_rows
        if model.info.n_swa > 0:
            # the sliding-window cache is sized from n_ctx too and must hold the window and a batch
            n_ctx = max(n_ctx, model.info.n_swa + n_batch)
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.kv_unified = kv_unified or n_seq_max == 1
        params.no_perf = True
        # llama.cpp's default sizes a sliding-window cache like the full one: keep it to the window
        params.swa_full = False
        attn_all_rows = attn_all_rows or n_last_rows <= 0  # a window of no rows: only the full softmax
        if attn and attn_all_rows and (flash_attn or prompt_flash_attn):
            raise ValueError("attention statistics over every query row need flash attention off")
        if prompt_flash_attn is not None and flash_attn is None:
            raise ValueError("prompt_flash_attn needs flash_attn True or False (llama.cpp's auto decides once)")
        if (attn and attn_all_rows) or flash_attn is False:
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        elif flash_attn:
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
        else:
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_AUTO
        params.type_k = getattr(llama, f"GGML_TYPE_{check_cache_type(cache_type_k, 'cache_type_k').upper()}")
        params.type_v = getattr(llama, f"GGML_TYPE_{check_cache_type(cache_type_v, 'cache_type_v').upper()}")
        self.n_threads = resolve_threads(n_threads)
        params.n_threads = params.n_threads_batch = self.n_threads
        if eval_callback is not None:
            params.cb_eval = eval_callback
            params.cb_eval_user_data = None
        self._ptr = llama.llama_init_from_model(model.ptr, params)
        if not self._ptr:
            raise DecodeError(f"llama.cpp could not create a context of {n_ctx} cells (out of memory?)")
        kind = native.lib.llama_infokv_memory_kind(self._ptr)
        self.n_cells = native.lib.llama_infokv_n_cells(self._ptr)
        if kind not in MEMORY_KINDS or (self.n_cells < 0 and kind != RECURRENT):
            self.close()
            if not params.kv_unified:
                raise UnsupportedArchitectureError(
                    f"{model.path.name}: a stream of cells per sequence (kv_unified off) is for a plain KV cache "
                    f"only; this model's memory shares one (run its sequences with kv_unified on)")
            raise UnsupportedArchitectureError(
                f"{model.path.name}: its memory ({MEMORY_KINDS.get(kind, 'indexed or sparse attention')}) has no "
                f"KV cache this engine can evict single tokens from (see docs/memory.md)"
            )
        self.memory = MEMORY_KINDS[kind]
        self.has_cells = kind != RECURRENT  # a recurrent state alone has no cells at all
        self.n_cells = max(self.n_cells, 0)
        self.n_streams = max(1, int(native.lib.llama_infokv_n_streams(self._ptr)))
        self.n_size = self.n_cells // self.n_streams  # cells per stream (every cell with one stream)
        growing, bounded = ctypes.c_uint64(), ctypes.c_uint64()
        native.lib.llama_infokv_memory_bytes(self._ptr, ctypes.byref(growing), ctypes.byref(bounded))
        self.growing_bytes, self.bounded_bytes = int(growing.value), int(bounded.value)
        self.has_window = self.bounded_cells() is not None  # a sliding-window cache beside the growing part
        # the layers whose attention is over the growing part's cells (the others' statistics rows are 0)
        attends = [native.lib.llama_infokv_layer_attends_growing(self._ptr, il) for il in range(model.info.n_layer)]
        self.attn_layers = np.flatnonzero(np.asarray(attends) == 1)
        self._all_attn_layers = len(self.attn_layers) == model.info.n_layer
        self.n_attn_layers = len(self.attn_layers)
        self.attn_all_rows = attn_all_rows
        wants_stats = attn or layer_dist
        if wants_stats and not self.grows:
            self.close()
            raise UnsupportedArchitectureError(
                f"{model.path.name}: its {self.memory} memory has no growing KV cache, so there are no cells to "
                f"collect statistics over (run it without eviction: policy 'full')")
        if self.has_cells and native.lib.llama_infokv_set_stats_ext(self._ptr, attn, n_last_rows, layer_dist,
                                                                    attn_all_rows) != 0:
            self.close()
            raise UnsupportedArchitectureError(f"{model.path.name}: statistics are not supported for this memory")
        self.n_batch = n_batch
        self.n_vocab = model.info.n_vocab
        self.n_layer = model.info.n_layer
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self._batch = llama.llama_batch_init(n_batch, 0, 1)
        self._last_entropy: dict[int, float] = {}
        self._attn_active = attn
        # flash attention of prompt calls (False) and of one-token steps (True); what the next llama_decode runs
        self._call_flash_attn = {False: flash_attn if prompt_flash_attn is None else prompt_flash_attn,
                                 True: flash_attn}
        self._flash_attn_now = flash_attn
        self._has_output_row = False  # llama.cpp allocates the logits' rows at the first decode
        self._keys_shape: tuple[np.ndarray, int] | None = None  # read_keys' layers and key width
        self._output_rows: dict[int, np.ndarray] = {}  # each sequence's output rows in the last decode (batch indices)
        self.generating = False

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def ptr(self) -> llama.llama_context_p:
        if not self._ptr:
            raise ValueError("the context is closed")
        return self._ptr

    @property
    def closed(self) -> bool:
        return not getattr(self, "_ptr", None)

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ptr", None):
            llama.llama_free(self._ptr)
            self._ptr = None

    def __enter__(self) -> StatsContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # ---- cells -----------------------------------------------------------------------------
    @property
    def grows(self) -> bool:
        """Whether part of the memory grows with the sequence (KV cells of layers attending over all of it):
        False for a recurrent state alone, or a hybrid whose attention layers all use a sliding window."""
        return self.has_cells and self.n_attn_layers > 0

    @property
    def n_used(self) -> int:
        """Cells in use, by every sequence."""
        return int(native.lib.llama_infokv_n_used(self.ptr)) if self.has_cells else 0

    def stream_base(self, seq: int = SEQ) -> int:
        """The flat index of the first cell of ``seq``'s stream (0 in a unified cache): with a stream per
        sequence, the sequence's cells are ``stream_base(seq) .. stream_base(seq) + n_size - 1``."""
        return seq * self.n_size if self.n_streams > 1 else 0

    def n_used_by(self, seq: int = SEQ) -> int:
        """Cells held by sequence ``seq``."""
        return int(native.lib.llama_infokv_seq_cells(self.ptr, seq, None, None, 0)) if self.has_cells else 0

    def cell_map(self, seq: int = SEQ) -> tuple[np.ndarray, np.ndarray]:
        """The sequence's (cells, positions), ordered by position."""
        if not self.has_cells:
            return np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int32)
        n = native.lib.llama_infokv_seq_cells(self.ptr, seq, None, None, 0)
        cells = np.empty(n, dtype=np.int32)
        pos = np.empty(n, dtype=np.int32)
        if n:
            native.lib.llama_infokv_seq_cells(
                self.ptr, seq, cells.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), n,
            )
        return cells, pos

    @property
    def bounded(self) -> bool:
        """Whether the memory has a bounded part beside the growing one (a sliding-window cache, a
        recurrent state)."""
        return self.memory != "dense"

    @property
    def rolls_back(self) -> bool:
        """Whether the newest positions can be dropped and read again (not through a recurrent state, which
        holds every token read in one summary)."""
        return self.memory not in ("hybrid", "recurrent")

    def bounded_cells(self) -> tuple[int, int] | None:
        """(cells in use, cells) of the sliding-window cache, or None when the memory has none."""
        used, size = ctypes.c_int32(), ctypes.c_int32()
        if native.lib.llama_infokv_bounded_cells(self.ptr, ctypes.byref(used), ctypes.byref(size)) != 0:
            return None
        return int(used.value), int(size.value)

    def drop_bounded_from(self, pos: int, seq: int = SEQ) -> None:
        """Remove positions ``pos..`` from the bounded part too (after their cells in the growing part were
        removed): ``llama_memory_seq_rm``, which on a sliding-window memory clears both caches."""
        if self.bounded and not llama.llama_memory_seq_rm(llama.llama_get_memory(self.ptr), seq, int(pos), -1):
            raise DecodeError(f"llama.cpp could not drop positions {pos}.. from the {self.memory} memory")

    def can_roll_back_to(self, pos: int, seq: int = SEQ) -> bool:
        """Whether the sequence can continue at ``pos`` after the positions from ``pos`` on are dropped: always
        for a dense cache; for a sliding-window one while its cache still holds the window before ``pos``
        (it reuses the cells of positions that left the window of the newest token; it holds one
        contiguous run of positions, so its lowest position decides); for a hybrid only when nothing is
        dropped (a recurrent state cannot forget its last tokens)."""
        if not self.bounded:
            return True
        mem = llama.llama_get_memory(self.ptr)
        if not self.rolls_back:
            return pos > llama.llama_memory_seq_pos_max(mem, seq)  # nothing to drop
        lowest = llama.llama_memory_seq_pos_min(mem, seq)
        return lowest <= max(0, pos - self.model.info.n_swa + 1)

    def growing_rows(self, per_layer: np.ndarray) -> np.ndarray:
        """The rows of the layers attending over the growing part's cells (:attr:`attn_layers`) of a per-layer
        array: the array itself when that is every layer (a view, no copy)."""
        return per_layer if self._all_attn_layers else per_layer[self.attn_layers]

    def remove_cells(self, cells: Sequence[int] | np.ndarray, seq: int = SEQ) -> int:
        """Remove the sequence from these cells (O(k)); returns how many cells were freed."""
        arr = np.ascontiguousarray(cells, dtype=np.int32)
        n = native.lib.llama_infokv_seq_rm_cells(
            self.ptr, seq, arr.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), int(arr.size)
        )
        if n < 0:
            raise ValueError(f"cannot remove cells {arr.tolist()[:8]}...: out of range or not in the sequence")
        return int(n)

    def key_layers(self) -> np.ndarray:
        """The layers whose keys :meth:`read_keys` returns (those holding their own K in the growing part)."""
        return self._key_shape()[0]

    def _key_shape(self) -> tuple[np.ndarray, int]:
        if self._keys_shape is not None:  # a context's key layers and width never change
            return self._keys_shape
        n = int(native.lib.llama_infokv_key_layers(self.ptr, None, 0)) if self.has_cells else -1
        if n <= 0:
            raise UnsupportedArchitectureError(f"{self.model.path.name}: its {self.memory} memory has no keys to read")
        layers = np.empty(n, dtype=np.int32)
        native.lib.llama_infokv_key_layers(self.ptr, layers.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), n)
        # the K width, from one cell's read: no key is wider than all query heads of the widest head size
        bound = self.model.info.n_head * max(self.model.info.n_embd // max(self.model.info.n_head, 1), 512)
        probe = np.empty(n * bound, dtype=np.float32)
        width = int(native.lib.llama_infokv_get_keys(self.ptr, (ctypes.c_int32 * 1)(0), 1,
                                                     probe.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), probe.size))
        if width <= 0 or width % self.model.info.n_head_kv:
            raise UnsupportedArchitectureError(f"{self.model.path.name}: llama.cpp cannot read this cache's keys "
                                               f"(code {width})")
        self._keys_shape = (layers, width)
        return self._keys_shape

    def read_keys(self, cells: Sequence[int] | np.ndarray) -> np.ndarray:
        """The cached keys of ``cells`` (after RoPE, as the cache stores them, dequantized): an array
        [layers of :meth:`key_layers`, cells, KV heads, head size] of float32. One copy per layer from the
        backend, so it is meant for a compression, not every step. A quantized K cache holds each head's keys
        rotated (llama.cpp's Hadamard ``attn_rot_k``): norms and the similarities between keys are kept, the
        coordinates are not."""
        arr = np.ascontiguousarray(cells, dtype=np.int32)
        layers, width = self._key_shape()
        out = np.empty((len(layers), arr.size, width), dtype=np.float32)
        got = int(native.lib.llama_infokv_get_keys(
            self.ptr, arr.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), int(arr.size),
            out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), int(out.size)))
        if got == -2:
            raise ValueError(f"cannot read the keys of cells {arr.tolist()[:8]}...: out of range")
        if got != width:
            raise UnsupportedArchitectureError(f"{self.model.path.name}: llama.cpp cannot read this cache's keys "
                                               f"(code {got})")
        n_head_kv = self.model.info.n_head_kv
        return out.reshape(len(layers), arr.size, n_head_kv, width // n_head_kv)

    def compact_positions(self, seq: int = SEQ) -> int:
        """Renumber the sequence's cells so the holes eviction left are closed, keeping their order; returns
        the next free position.

        A dense or hybrid memory's cells become positions 0..n-1. Beside a sliding-window cache, the holes
        below that cache's lowest position are closed and the window's positions are shifted as one
        block, so the sliding-window cache (which holds every position of its window, evicted ones in the
        growing part included) keeps its spacing and every one of its tokens sees the same window.
        One ``llama_memory_seq_add`` (llama.cpp's batched K-shift, which re-rotates the keys; on a
        sliding-window or hybrid memory it shifts both parts) per run of positions with no hole between
        them. Raises :class:`UnsupportedArchitectureError` when this model's cache cannot shift positions.
        """
        mem = llama.llama_get_memory(self.ptr)
        swa = self.has_window
        must = f"{self.model.path.name}: positions must be renumbered (they reached the model's trained context) but"
        refusal = self.renumbering_refusal()
        if refusal:
            raise UnsupportedArchitectureError(f"{must} {refusal}")
        _, pos = self.cell_map(seq)
        target = np.arange(len(pos))
        lowest = int(llama.llama_memory_seq_pos_min(mem, seq)) if swa else -1  # the sliding-window cache's
        below = int(np.searchsorted(pos, lowest)) if lowest >= 0 else len(pos)
        target[below:] = pos[below:] - (lowest - below)
        delta = target - pos
        starts = np.r_[0, np.flatnonzero(np.diff(delta)) + 1] if below else np.empty(0, dtype=np.int64)
        starts = starts[starts < below]
        ends = np.r_[starts[1:], below] if len(starts) else starts
        for s, e in zip(starts, ends, strict=True):
            if delta[s]:
                llama.llama_memory_seq_add(mem, seq, int(pos[s]), int(pos[e - 1]) + 1, int(delta[s]))
        if lowest >= 0 and lowest != below:
            # the window as one block, from the sliding-window cache's lowest position to the newest
            llama.llama_memory_seq_add(mem, seq, lowest, -1, below - lowest)
        elif swa and not delta.any():
            raise UnsupportedArchitectureError(
                f"{must} its sliding-window cache holds every position from {lowest} on, so renumbering frees none")
        return int(llama.llama_memory_seq_pos_max(mem, seq)) + 1 if len(pos) or lowest >= 0 else 0

    def renumbering_refusal(self) -> str | None:
        """Why :meth:`compact_positions` cannot renumber this memory's positions, or None when it can."""
        swa = self.has_window
        if not (llama.llama_memory_can_shift(llama.llama_get_memory(self.ptr)) or (swa and self._window_shiftable())):
            return "this model's cache cannot shift positions"
        if swa and self.model.info.arch == "llama4":
            # chunked attention: a token attends within its chunk of positions, so a shift moves the boundaries
            return "its chunked attention ties tokens to fixed chunks of positions"
        return None

    def _window_shiftable(self) -> bool:
        """Whether a sliding-window memory's caches can shift positions one by one: llama.cpp's iSWA says no
        whenever its two caches differ in size (a rule for llama-server's context shift, which would move
        tokens out of the smaller cache's window), so the rule of each cache is asked of the model here, as
        ``llama_kv_cache::get_can_shift`` has it: not for several positions per embedding (M-RoPE) nor
        Step-3.5's per-layer RoPE dimensions."""
        multi = {llama.LLAMA_ROPE_TYPE_MROPE, llama.LLAMA_ROPE_TYPE_IMROPE, llama.LLAMA_ROPE_TYPE_VISION}
        return llama.llama_model_rope_type(self.model.ptr) not in multi and self.model.info.arch != "step35"

    def clear(self, seq: int | None = None) -> None:
        """Forget sequence ``seq`` (its cells are freed), or every sequence (None)."""
        mem = llama.llama_get_memory(self.ptr)
        if seq is None or self.n_seq_max == 1:
            llama.llama_memory_clear(mem, True)
            self._last_entropy.clear()
        else:
            llama.llama_memory_seq_rm(mem, seq, -1, -1)
            self._last_entropy.pop(seq, None)

    # ---- decoding --------------------------------------------------------------------------
    def entropy_before(self, seq: int = SEQ) -> float:
        """Entropy at the last token of ``seq`` decoded (NaN if unknown): what produced the next call's first
        token, and the value interpolation starts from. Set it (:meth:`set_entropy_before`) when the sequence
        is restored or rewound."""
        return self._last_entropy.get(seq, float("nan"))

    def set_entropy_before(self, value: float, seq: int = SEQ) -> None:
        self._last_entropy[seq] = float(value)

    @property
    def last_entropy(self) -> float:
        """:meth:`entropy_before` of the single sequence."""
        return self.entropy_before(SEQ)

    @last_entropy.setter
    def last_entropy(self, value: float) -> None:
        self.set_entropy_before(value, SEQ)

    def set_attention_active(self, active: bool) -> None:
        """Attention statistics for the next decodes or not (only with ``attn``): switching costs nothing
        (no graph reserve, the patch's ``llama_infokv_set_attn_active``); while off, a decode builds no
        statistics nodes and its signals have no attention."""
        if not self.attn or active == self._attn_active:
            return
        if native.lib.llama_infokv_set_attn_active(self.ptr, active) != 0:
            raise DecodeError("llama.cpp refused to switch the attention statistics (not enabled for this context)")
        self._attn_active = active

    @property
    def split_flash_attn(self) -> bool:
        """Whether prompts are read with flash attention on and one-token steps decoded with it off."""
        return self._call_flash_attn[False] is True and self._call_flash_attn[True] is False

    def set_prompt_flash_attn(self, on: bool) -> None:
        """Flash attention of the next calls that are not generation steps, in a context made with it on or off
        (not llama.cpp's auto)."""
        if self._call_flash_attn[True] is None:
            raise ValueError("prompt_flash_attn needs flash_attn True or False (llama.cpp's auto decides once)")
        self._call_flash_attn[False] = on

    def _use_flash_attn(self, on: bool | None) -> None:
        if on is None or on == self._flash_attn_now:
            return
        if native.lib.llama_infokv_set_flash_attn(self.ptr, on) != 0:
            raise DecodeError(f"llama.cpp refused to turn flash attention {'on' if on else 'off'} for this context")
        self._flash_attn_now = on

    def decode(self, tokens: Sequence[int], start_pos: int, all_outputs: bool = True, stride: int = 1,
               logits_all: bool = False, seq: int = SEQ, step: bool = False) -> Signals:
        """Decode ``tokens`` of sequence ``seq`` at positions ``start_pos..`` and return the call's signals.

        ``all_outputs``: every token's entropy and layer distances, else the last token's only. With
        ``stride`` k > 1 they are computed for the tokens at positions p with p % k == k - 1 and for the
        last token, and interpolated linearly in between (:func:`signal_rows`): llama.cpp then runs the
        LM head on those rows only. ``logits_all`` makes every token an output (its logits readable
        with :meth:`logits_rows`) whatever the signals' rows.

        Raises :class:`CacheFull` (nothing changed) when the cache has no room for the batch.
        """
        return self.decode_parts([DecodePart(seq, tokens, start_pos, all_outputs, stride, logits_all,
                                             self.entropy_top_k, step)])[0]

    def decode_parts(self, parts: Sequence[DecodePart]) -> list[Signals]:
        """Decode several sequences' tokens in one ``llama_decode`` (each :class:`DecodePart` as
        :meth:`decode` would alone) and return each part's signals, in order. The attention statistics are
        the call's (``attn_sum`` sums every row; a cell is attended only by its own sequence's rows);
        ``attn_last`` holds the part's own rows among the call's last ones. :attr:`output_index` says where
        each sequence's last output row is, for :meth:`logits`."""
        n = sum(len(p.tokens) for p in parts)
        if not parts or n > self.n_batch or any(not len(p.tokens) for p in parts):
            raise ValueError(f"a batch holds 1..{self.n_batch} tokens, at least one per part (got "
                             f"{[len(p.tokens) for p in parts]})")
        if len({p.seq for p in parts}) != len(parts) or any(not 0 <= p.seq < self.n_seq_max for p in parts):
            raise ValueError(f"each part must be a different sequence of 0..{self.n_seq_max - 1}")
        b = self._batch
        layout: list[tuple[int, np.ndarray, np.ndarray]] = [(0, np.empty(0), np.empty(0))] * len(parts)
        # (offset, signal rows, outputs) per part. With a stream per sequence llama.cpp splits a batch into
        # micro-batches of consecutive sequence ids in the order they come: in order of id, one suffices
        order = sorted(range(len(parts)), key=lambda j: parts[j].seq) if self.n_streams > 1 else range(len(parts))
        i = 0
        for at in order:
            p = parts[at]
            k = len(p.tokens)
            if p.stride < 1:
                raise ValueError(f"stride must be >= 1 (got {p.stride})")
            rows = signal_rows(k, p.start_pos, p.stride) if p.all_outputs else np.array([k - 1], dtype=np.int32)
            outputs = np.zeros(k, dtype=bool)
            outputs[rows] = True
            if p.logits_all:
                outputs[:] = True
            for j, tok in enumerate(p.tokens):
                b.token[i + j] = tok
                b.pos[i + j] = p.start_pos + j
                b.n_seq_id[i + j] = 1
                b.seq_id[i + j][0] = p.seq
                b.logits[i + j] = bool(outputs[j])
            layout[at] = (i, rows, np.flatnonzero(outputs))
            i += k
        b.n_tokens = n
        self._use_flash_attn(self._call_flash_attn[all(p.step for p in parts)])
        rc = llama.llama_decode(self.ptr, b)
        self._has_output_row = self._has_output_row or rc == 0
        if rc == 1:
            raise CacheFull(f"no free cells for {n} tokens ({self.n_used}/{self.n_cells} used)")
        if rc != 0:
            raise DecodeError(f"llama_decode failed with code {rc}")
        self._output_rows = {p.seq: off + outs for p, (off, _, outs) in zip(parts, layout, strict=True)}
        attn_sum, attn_last, ldist = self._attn_sum(), self._attn_last(), self._layer_dist()
        all_outputs = np.sort(np.concatenate([off + outs for off, _, outs in layout]))
        entropies = self._entropies(parts, layout)
        signals = []
        for p, (off, rows, outs), ent in zip(parts, layout, entropies, strict=True):
            k = len(p.tokens)
            last = attn_last
            if last is not None and len(parts) > 1 and self.n_streams > 1:
                last = last[:, -min(k, last.shape[1]):]  # each stream's last rows are the bottom ones
            elif last is not None and len(parts) > 1:
                first_row = n - last.shape[1]  # the call's last rows: tokens first_row..n-1
                lo, hi = max(off, first_row) - first_row, off + k - first_row
                last = last[:, lo:hi] if hi > lo else None
            own = None
            if ldist is not None:  # one column per output of the call, in batch order
                cols = np.searchsorted(all_outputs, off + outs)
                own = ldist[:, cols] if len(parts) > 1 or len(cols) != ldist.shape[1] else ldist
            signals.append(self._signals(p, rows, outs, ent, own, attn_sum, last))
        return signals

    def _entropies(self, parts: Sequence[DecodePart],
                   layout: list[tuple[int, np.ndarray, np.ndarray]]) -> list[np.ndarray | None]:
        """Each part's entropies at its signal rows (one kernel call for the parts with the same top-k)."""
        out: list[np.ndarray | None] = [None] * len(parts)
        for k in {p.entropy_top_k for p in parts if p.entropy_top_k is not None}:
            idx = [j for j, p in enumerate(parts) if p.entropy_top_k == k]
            rows = np.concatenate([layout[j][0] + layout[j][1] for j in idx])
            ent = kernels.topk_entropy_ctx(self.ptr, rows, self.n_vocab, k, self.n_threads)
            at = 0
            for j in idx:
                m = len(layout[j][1])
                out[j] = ent[at:at + m]
                at += m
        return out

    def sample(self, sampler: Sampler) -> int:
        """Sample the next token from the last decode's last output row (and accept it)."""
        return sampler.sample(self)

    def set_generating(self, generating: bool) -> None:
        """Whether the sequence is inside a generation loop (matters only to a shared context)."""
        self.generating = generating

    @property
    def output_index(self) -> dict[int, int]:
        """Each sequence's last output row in the last :meth:`decode_parts` (a batch index, for :meth:`logits`)."""
        return {seq: int(rows[-1]) for seq, rows in self._output_rows.items()}

    def logits(self, i: int = -1) -> np.ndarray:
        """Logits of output row ``i`` of the last decode (a copy; a batch index, or negative from the last)."""
        return self.logits_view(i).copy()

    def logits_view(self, i: int = -1) -> np.ndarray:
        """:meth:`logits` without the copy: valid until the next decode."""
        ptr = llama.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise ValueError(f"no logits for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def logits_rows(self, n: int) -> np.ndarray:
        """Logits [n, n_vocab] of the first n outputs of the last decode (a view, valid until the next decode)."""
        ptr = llama.llama_get_logits(self.ptr)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab))

    def sequence_logits(self, seq: int) -> np.ndarray:
        """Logits [outputs, n_vocab] of sequence ``seq``'s output rows in the last :meth:`decode_parts`, in token
        order (a copy; in a call of several parts each part's rows are found by batch index)."""
        return np.stack([self.logits_view(int(i)) for i in self._output_rows[seq]])

    def _signals(self, part: DecodePart, rows: np.ndarray, outputs: np.ndarray, ent: np.ndarray | None,
                 ldist: np.ndarray | None, attn_sum: np.ndarray | None, attn_last: np.ndarray | None) -> Signals:
        """A part's signals: entropy and layer distances measured on ``rows`` (token indices, ascending,
        the last token among them), interpolated between them when ``part.all_outputs`` (else NaN
        elsewhere); ``outputs`` are the part's output tokens."""
        n, spread, seq = len(part.tokens), part.all_outputs, part.seq
        ent_at = ent_prod = None
        if ent is not None:
            before = self.entropy_before(seq)
            ent_at = place_rows(ent[None, :], rows, n, spread, before)[0]
            ent_prod = np.concatenate([[before], ent_at[:-1]]).astype(np.float32)
            self._last_entropy[seq] = float(ent[-1])
        if ldist is not None and len(rows) < n:
            ldist = place_rows(ldist[:, np.searchsorted(outputs, rows)], rows, n, spread)
        cells, cell_pos = self.cell_map(seq)
        return Signals(
            positions=np.arange(part.start_pos, part.start_pos + n, dtype=np.int32),
            entropy_produced=ent_prod,
            entropy_at=ent_at,
            layer_dist=ldist,
            attn_sum=attn_sum,
            attn_last=attn_last,
            cells=cells,
            cell_pos=cell_pos,
        )

    def _attn_sum(self) -> np.ndarray | None:
        nl, nc = ctypes.c_int32(), ctypes.c_int32()
        ptr = native.lib.llama_infokv_get_attn_sum(self.ptr, ctypes.byref(nl), ctypes.byref(nc))
        if not ptr:
            return None
        return self.growing_rows(np.ctypeslib.as_array(ptr, shape=(nl.value, nc.value))).copy()

    def _attn_last(self) -> np.ndarray | None:
        nl, nr, nc = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
        ptr = native.lib.llama_infokv_get_attn_last(self.ptr, ctypes.byref(nl), ctypes.byref(nr), ctypes.byref(nc))
        if not ptr:
            return None
        return self.growing_rows(np.ctypeslib.as_array(ptr, shape=(nl.value, nr.value, nc.value))).copy()

    def _layer_dist(self) -> np.ndarray | None:
        nl, nt = ctypes.c_int32(), ctypes.c_int32()
        ptr = native.lib.llama_infokv_get_layer_dist(self.ptr, ctypes.byref(nl), ctypes.byref(nt))
        if not ptr:
            return None
        return np.ctypeslib.as_array(ptr, shape=(nl.value, nt.value)).copy()

    # ---- saving and restoring a sequence (parking a conversation) -------------------------------
    def save_sequence(self, seq: int = SEQ) -> bytes:
        """The sequence's cells as llama.cpp serialises them (``llama_state_seq_get_data``): every
        cached token's position, K and V, holes left by eviction included. Logits are not saved. The data
        is that of a one-stream cache whatever this context's layout, so a sequence saved from a stream of a
        shared context loads into a context of its own and back."""
        size = llama.llama_state_seq_get_size(self.ptr, seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama.llama_state_seq_get_data(self.ptr, buf, size, seq)
        if n != size:
            raise DecodeError(f"llama_state_seq_get_data wrote {n} bytes, {size} expected")
        data = ctypes.string_at(buf, n)
        return _one_stream(data, self.n_streams, seq) if self.n_streams > 1 else data

    def load_sequence(self, data: bytes, cells: np.ndarray | None = None, seq: int = SEQ) -> None:
        """Replace the sequence by one saved with :meth:`save_sequence` (``llama_state_seq_set_data``).

        The tokens keep their positions (and the holes eviction left between them). llama.cpp puts
        restored cells in the first free cells, in the order of their old indices, so a cache with
        holes comes back compacted: the attention then sums over the cells in another arrangement
        and results differ in the last bits. ``cells`` (the sequence's old cell indices, ascending,
        as :meth:`cell_map` gave them before saving) puts every cell back at its old index: the
        holes are filled with placeholder cells in the data given to llama.cpp, then freed. In a context of
        unified cache of several sequences, cells other sequences hold now cannot be taken: the cells then
        come back where llama.cpp puts them (results differ in the last bits, as above); a stream of the
        sequence's own always takes them back.
        """
        self._ensure_output_row(seq)
        self.clear(seq)
        placeholders: np.ndarray | None = None
        base = self.stream_base(seq)
        if cells is not None and len(cells) and (self.n_streams > 1 or self.n_used == 0):
            local = np.sort(np.asarray(cells, dtype=np.int64)) - base
            if local[0] < 0 or local[-1] >= self.n_size:
                raise ValueError(f"cells {cells[:8]}... are not in sequence {seq}'s stream")
            data, placeholders = _with_placeholders(data, local, self.n_size, trailing=self.bounded)
        if self.n_streams > 1:
            data = _in_stream(data, self.n_streams, seq)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama.llama_state_seq_set_data(self.ptr, buf, len(data), seq) == 0:
            self.clear(seq)
            raise DecodeError(f"llama.cpp could not restore a saved sequence of {len(data)} bytes into a context of "
                              f"{self.n_cells} cells (saved from a different model or a larger context?)")
        if placeholders is not None and len(placeholders):
            self.remove_cells(placeholders + base, seq)

    def save_bounded(self, seq: int = SEQ) -> bytes:
        """The bounded part of the sequence's memory alone: the sliding-window cache's cells within the window,
        or the recurrent state (``llama_state_seq_get_data_ext`` with ``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY``, what
        llama.cpp's server keeps as a context checkpoint). The growing part is not written."""
        if not self.bounded:
            raise ValueError("a dense memory has no bounded part to save")
        if self.n_streams > 1:
            raise ValueError("a memory with a stream per sequence has no bounded part")
        flags = llama.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        size = llama.llama_state_seq_get_size_ext(self.ptr, seq, flags)
        buf = (ctypes.c_uint8 * size)()
        n = llama.llama_state_seq_get_data_ext(self.ptr, buf, size, seq, flags)
        if n != size:
            raise DecodeError(f"llama_state_seq_get_data_ext wrote {n} bytes, {size} expected")
        return ctypes.string_at(buf, n)

    def load_bounded(self, data: bytes, seq: int = SEQ) -> None:
        """Replace the bounded part of the sequence's memory by one saved with :meth:`save_bounded`; the growing
        part is left as it is (the caller has removed its cells of the positions the saved part had not read)."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama.llama_state_seq_set_data_ext(self.ptr, buf, len(data), seq,
                                              llama.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) == 0:
            raise DecodeError(f"llama.cpp could not restore the {self.memory} memory's bounded part "
                              f"({len(data)} bytes)")

    def _ensure_output_row(self, seq: int = SEQ) -> None:
        """Give a context that never decoded an output row (llama.cpp allocates it at the first decode), so a
        restored sequence's logits can be put back with :meth:`set_last_logits` instead of decoding its last
        token again, which a sliding-window or recurrent memory would take as a new token. One token is
        decoded alone in ``seq`` and the sequence cleared; the caller clears it anyway."""
        if self._has_output_row:
            return
        b = self._batch
        b.token[0], b.pos[0], b.n_seq_id[0], b.seq_id[0][0], b.logits[0] = 0, 0, 1, seq, True
        b.n_tokens = 1
        if llama.llama_decode(self.ptr, b) != 0:
            raise DecodeError("llama.cpp could not decode a token to make the context's output row")
        self._has_output_row = True
        self.clear(seq)

    def set_last_logits(self, logits: np.ndarray) -> bool:
        """Overwrite the last output row's logits (what sampling reads next) with ``logits``, e.g. a
        restored sequence's. Returns False, changing nothing, when the context has no output row yet."""
        ptr = llama.llama_get_logits_ith(self.ptr, -1)
        if not ptr:
            return False
        row = np.ascontiguousarray(logits, dtype=np.float32)
        if row.shape != (self.n_vocab,):
            raise ValueError(f"logits of shape {row.shape}, expected ({self.n_vocab},)")
        ctypes.memmove(ptr, row.ctypes.data, row.nbytes)
        self._output_rows = {}
        return True

def signal_rows(n: int, start_pos: int, stride: int) -> np.ndarray:
    """The tokens of a batch of ``n`` at ``start_pos..`` whose signals are measured with ``stride`` k: those at
    positions p with p % k == k - 1, and the last (aligned on positions, so chunking does not move them)."""
    first = (stride - 1 - start_pos) % stride
    rows = np.arange(first, n, stride, dtype=np.int32)
    if not len(rows) or rows[-1] != n - 1:
        rows = np.append(rows, np.int32(n - 1))
    return rows


def place_rows(values: np.ndarray, rows: np.ndarray, n: int, spread: bool, before: float = float("nan")) -> np.ndarray:
    """[k, len(rows)] values measured at ``rows`` as [k, n] over the batch: as they are when every token was
    measured, else interpolated in between (``spread``, see :func:`interpolate_rows`) or NaN where not measured."""
    if len(rows) == n:
        return values
    if spread:
        return interpolate_rows(values, rows, n, before)
    out = np.full((values.shape[0], n), np.nan, dtype=np.float32)
    out[:, rows] = values
    return out


def interpolate_rows(values: np.ndarray, rows: np.ndarray, n: int, before: float = float("nan")) -> np.ndarray:
    """[k, len(rows)] values measured at ``rows`` spread over the n tokens of the batch, linearly in between.

    ``before`` is the value at the token just before the batch (row -1), when known: tokens ahead of the
    first measured row lie between the two; without it they take the first measured value."""
    xp = rows.astype(np.float64)
    out = np.empty((values.shape[0], n), dtype=np.float32)
    x = np.arange(n, dtype=np.float64)
    for i, fp in enumerate(values.astype(np.float64)):
        if np.isfinite(before) and rows[0] > 0:
            out[i] = np.interp(x, np.concatenate([[-1.0], xp]), np.concatenate([[before], fp]))
        else:
            out[i] = np.interp(x, xp, fp)
    return out


_STREAM_HEAD = 8  # llama_context's magic and the sequence id come before the KV cache's stream count


def _one_stream(data: bytes, n_stream: int, stream: int) -> bytes:
    """A sequence saved from stream ``stream`` of an ``n_stream``-stream cache (llama.cpp writes every stream's
    cell count, 0 for the others, then the one stream's cells) as a one-stream cache writes it."""
    head = _STREAM_HEAD
    counts_before = np.frombuffer(data[head + 4:head + 4 + 4 * stream], dtype=np.uint32)
    tail = 4 * (n_stream - stream - 1)
    if (int(np.frombuffer(data[head:head + 4], dtype=np.uint32)[0]) != n_stream or counts_before.any()
            or (tail and any(data[-tail:]))):
        raise DecodeError(f"the saved sequence is not one stream's of {n_stream} (llama.cpp's layout changed?)")
    body = data[head + 4 + 4 * stream:len(data) - tail]
    return data[:head] + np.uint32(1).tobytes() + body


def _in_stream(data: bytes, n_stream: int, stream: int) -> bytes:
    """The inverse of :func:`_one_stream`: one-stream data as stream ``stream`` of an ``n_stream``-stream cache."""
    head = _STREAM_HEAD
    if int(np.frombuffer(data[head:head + 4], dtype=np.uint32)[0]) != 1:
        return data  # saved from a cache of the same streams: llama.cpp checks the count itself
    zeros = bytes(4)
    return (data[:head] + np.uint32(n_stream).tobytes() + zeros * stream + data[head + 4:]
            + zeros * (n_stream - stream - 1))


def _with_placeholders(data: bytes, cells: np.ndarray, n_cells: int,
                       trailing: bool = False) -> tuple[bytes, np.ndarray | None]:
    """The saved sequence ``data`` (llama.cpp's layout: a magic and the sequence id, the stream count, the
    cells in index order (position, 1, sequence id), then per layer their K
    rows and V rows or transposed V columns) rewritten to hold cells 0..max(cells), the missing
    ones as placeholders (zero K/V, positions past the sequence's), and the placeholders' indices.
    ``trailing``: the growing part's cells are followed by the bounded part's (a sliding-window cache),
    kept as they are. Returns ``data`` unchanged and None when the layout is not the one this expects."""
    n = len(cells)
    m = int(cells[-1]) + 1
    if m > n_cells or m == n:
        return data, (np.empty(0, dtype=np.int32) if m == n else None)
    try:
        off = 0

        def take(k: int) -> bytes:
            nonlocal off
            if off + k > len(data):
                raise ValueError("short")
            out = data[off:off + k]
            off += k
            return out

        prefix = take(8)  # llama_context's magic and the sequence id
        n_stream, count = np.frombuffer(take(8), dtype=np.uint32)
        if n_stream != 1 or count != n:
            return data, None
        meta = np.frombuffer(take(12 * n), dtype=np.int32).reshape(n, 3)  # pos, n_seq_id, seq_id
        if not (meta[:, 1] == 1).all():
            return data, None
        holes = np.setdiff1d(np.arange(m), cells)
        new_meta = np.zeros((m, 3), dtype=np.int32)
        new_meta[cells] = meta
        new_meta[holes, 0] = meta[:, 0].max() + 1 + np.arange(len(holes))
        new_meta[holes, 1] = 1
        new_meta[holes, 2] = meta[0, 2]
        out = [prefix, np.array([1, m], dtype=np.uint32).tobytes(), new_meta.tobytes()]
        v_trans, n_layer = np.frombuffer(take(8), dtype=np.uint32)
        out.append(np.array([v_trans, n_layer], dtype=np.uint32).tobytes())

        def rows() -> None:
            head = take(12)  # type (i32), row size (u64)
            row = int(np.frombuffer(head[4:], dtype=np.uint64)[0])
            src = np.frombuffer(take(row * n), dtype=np.uint8).reshape(n, row)
            dst = np.zeros((m, row), dtype=np.uint8)
            dst[cells] = src
            out.extend([head, dst.tobytes()])

        for _ in range(n_layer):
            rows()
        for _ in range(n_layer):
            if not v_trans:
                rows()
                continue
            head = take(12)  # type (i32), element size (u32), n_embd_v_gqa (u32)
            el, n_embd = (int(x) for x in np.frombuffer(head[4:], dtype=np.uint32))
            src = np.frombuffer(take(el * n * n_embd), dtype=np.uint8).reshape(n_embd, n, el)
            dst = np.zeros((n_embd, m, el), dtype=np.uint8)
            dst[:, cells] = src
            out.extend([head, dst.tobytes()])
        if off != len(data):
            if not trailing:
                return data, None
            out.append(data[off:])
    except ValueError:
        return data, None
    return b"".join(out), holes.astype(np.int32)
