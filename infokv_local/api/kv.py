"""What the cache holds: the ``kv`` block, the grow-and-compress history and the cache map.

``max_used_cells`` means one thing everywhere: the most cells in use at any step since the
conversation began (the object's creation, :meth:`reset`, :meth:`configure`, or a prompt that
shares no prefix with the cache, which starts the sequence over). A request's ``usage.kv`` (and
every chunk's ``kv``) adds ``request_max_used_cells``: the most during that request alone.

Functions of an :class:`~infokv_local.api.InfoKVLlama` (its methods of the same names call them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..engine import bounded_kv_bytes, kv_bytes_per_token
from ..llamacpp.model import Model
from .text_stream import Utf8Pieces, token_bytes
from .types import KVStats, RequestKVStats

if TYPE_CHECKING:
    from .llama import InfoKVLlama


@dataclass
class CacheMap:
    """The conversation's tokens and what the cache holds of them (for display)."""

    pieces: list[str]  # the text of every token of the sequence (control tokens as their text; a character
    # split across tokens is on the token that completes it)
    in_cache: np.ndarray  # bool per token
    score: np.ndarray  # the policy's score per cached token (higher = kept longer); NaN otherwise
    protected: np.ndarray  # bool per token: a sink or recent token, never evicted
    evicted: np.ndarray  # bool per token: removed from the cache (not in_cache and not the undecoded last token)


@dataclass
class RequestRun:
    """Book-keeping of one request."""

    prompt_tokens: int
    reused_tokens: int
    first_step: int
    t_start: float
    t_first: float | None = None
    completion_tokens: int = 0
    max_used_cells: int = 0


def budget_mib_for(model: Model, tokens: int) -> float:
    """MiB of KV memory that ``tokens`` cached tokens take for ``model``."""
    return (tokens * kv_bytes_per_token(model) + bounded_kv_bytes(model)) / 2**20


def kv_stats(llm: InfoKVLlama) -> KVStats:
    """The ``kv`` block, read under the model's lock."""
    with llm._lock:
        return kv_block(llm)


def kv_block(llm: InfoKVLlama) -> KVStats:
    """The ``kv`` block (the caller holds the model's lock)."""
    e = llm.engine
    t = e.totals
    used = e.used_cells
    bounded = e.ctx.bounded_cells()
    return {
        "policy": e.policy.name,
        "budget": e.budget if e.policy.evicts else None,
        "buffer": e.buffer if e.policy.evicts else None,
        "capacity": e.capacity,
        "used_cells": used,
        "max_used_cells": max(t.max_used_cells, used),
        "kv_bytes": used * e.kv_bytes_per_cell,
        "kv_bytes_per_token": e.kv_bytes_per_cell,
        # the memory's bounded part beside the cache the budget counts (docs/memory.md)
        "memory": e.ctx.memory,
        "bounded_bytes": e.ctx.bounded_bytes,
        "bounded_cells": bounded[0] if bounded else None,
        "total_bytes": used * e.kv_bytes_per_cell + e.ctx.bounded_bytes,
        "checkpoints": len(e.checkpoints),
        "checkpoint_bytes": e.checkpoints.nbytes,
        "evictions": t.evictions,
        "evicted_tokens": t.evicted_tokens,
        "compactions": e.compactions,
        "prompt_probe": e.probe_len,
        "probes": e.probes,
        "sequence_tokens": len(e.tokens),
        "n_threads": e.n_threads,
        "flash_attn": e.flash_attn,
        "flash_attn_reason": e.flash_attn_reason,
        "eviction_note": e.eviction_note,
        "cache_type_k": e.cache_type_k,
        "cache_type_v": e.cache_type_v,
    }


def request_kv(llm: InfoKVLlama, run: RequestRun) -> RequestKVStats:
    """A request's ``kv`` block (the caller holds the model's lock)."""
    run.max_used_cells = llm.engine.totals.max_used_since(run.first_step)
    stats = kv_block(llm)
    now = time.perf_counter()
    return {
        **stats,
        "request_max_used_cells": max(run.max_used_cells, stats["used_cells"]),
        "reused_tokens": run.reused_tokens,
        "tokens_per_s": (run.completion_tokens - 1) / (now - run.t_first) if run.t_first and
        run.completion_tokens > 1 else None,
    }


def cell_history(llm: InfoKVLlama) -> list[tuple[int, int]]:
    """(tokens read so far, cells in use) before and after every engine step since the last reset."""
    return llm.engine.totals.cell_history()


def cache_map(llm: InfoKVLlama) -> CacheMap:
    """Every token of the sequence, whether it is still cached, and the policy's score of it."""
    with llm._lock:
        e = llm.engine
        idx, scores, protected = e.token_scores()
        n = len(e.tokens)
        pending = e.pending_token is not None
        utf8 = Utf8Pieces()  # a character split across tokens is shown on the token that completes it
        pieces = [utf8.push(token_bytes(llm.model, t, special=True)) for t in e.tokens]
    in_cache = np.zeros(n, dtype=bool)
    score = np.full(n, np.nan)
    prot = np.zeros(n, dtype=bool)
    ok = (idx >= 0) & (idx < n)
    in_cache[idx[ok]] = True
    score[idx[ok]] = scores[ok]
    prot[idx[ok]] = protected[ok]
    evicted = ~in_cache
    if n and pending:
        evicted[-1] = False
    return CacheMap(pieces=pieces, in_cache=in_cache, score=score, protected=prot, evicted=evicted)
