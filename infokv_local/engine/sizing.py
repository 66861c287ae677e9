"""How big a sequence's cache is: the budget (from tokens or MiB), the capacity, the batches, the checks.

A memory with a part that does not grow (a sliding-window cache, a recurrent state; docs/memory.md)
gives the budget to the growing part: ``budget_mib`` counts both parts, the bounded part's bytes are
read from llama.cpp once per model. A memory with nothing that grows runs without eviction, and
:attr:`CachePlan.eviction_note` says why once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BudgetError
from ..llamacpp.cache_types import row_bytes
from ..llamacpp.context import MemoryLayout, memory_layout
from ..llamacpp.model import Model
from ..policies import Policy, make_policy
from ..settings import DEFAULTS

# the prompt rows with signals in the flash-attention verdict's timed work (the default policy's stride)
DEFAULT_SIGNAL_STRIDE = make_policy(DEFAULTS.policy).signal_stride


@dataclass(frozen=True)
class CachePlan:
    """The sizes one engine runs with, checked."""

    policy: Policy  # the policy asked for, or ``full`` when nothing grows
    budget: int
    capacity: int  # budget + buffer with an evicting policy, else the whole context
    chunk: int  # a prompt chunk (at most the buffer when evicting)
    max_batch: int  # the largest llama_decode batch (consecutive chunks read together)
    n_ctx: int  # the context llama.cpp allocates for one sequence
    compact_at: int  # positions are renumbered before they pass this
    kv_bytes_per_cell: int  # of the growing cache
    layout: MemoryLayout | None  # both parts' sizes, for a memory that is not a plain KV cache
    eviction_note: str | None  # why eviction is off whatever the policy asked (None: it is not)


def plan_cache(model: Model, policy: str | Policy, budget: int | None, budget_mib: float | None, buffer: int,
               n_sink: int, n_recent: int, window: int, n_batch: int, max_context: int | None,
               compact_at: int | None, cache_type_k: str, cache_type_v: str) -> CachePlan:
    """The :class:`CachePlan` of these settings, or :class:`BudgetError` saying what is wrong (before any
    memory is allocated)."""
    pol = make_policy(policy)
    layout = (None if model.info.memory == "dense" else
              memory_layout(model, n_batch if isinstance(n_batch, int) and n_batch > 0 else 512,
                            cache_type_k, cache_type_v))
    per_cell = (layout.growing_bytes_per_cell if layout is not None else
                kv_bytes_per_token(model, cache_type_k, cache_type_v))
    note = None
    if layout is not None and not layout.grows:
        if pol.evicts:
            note = (f"nothing to evict: {model.path.name} keeps no KV cache that grows with the sequence (its "
                    f"{layout.memory} memory takes {layout.bounded_bytes / 2**20:.2f} MiB however long it runs); "
                    f"the {pol.name} policy and its budget have nothing to do")
        pol = make_policy("full")
    if budget_mib is not None:
        budget = _budget_of_mib(model, budget, budget_mib, layout, per_cell)
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
    if budget < 1:
        raise BudgetError(f"budget must be a positive number of tokens (got {budget})")
    if max_context is not None and max_context < 1:
        raise BudgetError(f"max_context must be a positive number of tokens (got {max_context})")
    if pol.evicts and budget < n_sink + n_recent + 1:
        raise BudgetError(
            f"a budget of {budget} tokens cannot hold the {n_sink} sink and {n_recent} recent tokens that are "
            f"never evicted plus at least one other: use a budget of at least {n_sink + n_recent + 1}, or fewer "
            f"sinks (n_sink) or recent tokens (n_recent)"
        )
    at = compact_at if compact_at is not None else model.info.n_ctx_train
    if pol.evicts and at <= budget + buffer:
        raise BudgetError(
            f"budget + buffer ({budget} + {buffer} = {budget + buffer} tokens) must be below "
            + (f"compact_at ({at})" if compact_at is not None else
               f"the model's trained context ({at} tokens): use a smaller budget")
        )
    if pol.evicts:
        capacity = n_ctx = budget + buffer
        chunk = min(n_batch, buffer)
        max_batch = min(n_batch, n_ctx)  # prompt chunks that all fit without a compression are read together
    else:
        capacity = n_ctx = max_context or model.info.n_ctx_train
        chunk = max_batch = n_batch
    return CachePlan(policy=pol, budget=budget, capacity=capacity, chunk=chunk, max_batch=max_batch, n_ctx=n_ctx,
                     compact_at=at, kv_bytes_per_cell=per_cell, layout=layout, eviction_note=note)


def _budget_of_mib(model: Model, budget: int | None, budget_mib: float, layout: MemoryLayout | None,
                   per_cell: int) -> int | None:
    """The budget in tokens that ``budget_mib`` MiB of KV memory hold (both parts counted)."""
    if isinstance(budget_mib, bool) or not isinstance(budget_mib, (int, float)) or not budget_mib > 0:
        raise BudgetError(f"budget_mib must be a positive number of MiB (got {budget_mib!r})")
    bounded = layout.bounded_bytes if layout is not None else 0
    if budget_mib * 2**20 <= bounded:
        raise BudgetError(
            f"budget_mib={budget_mib} is not above the part of {model.path.name}'s {model.info.memory} memory "
            f"that does not grow ({bounded / 2**20:.2f} MiB): give more MiB, or a budget in tokens")
    if not per_cell:
        return budget if budget is not None else 1  # nothing grows: any budget holds
    tokens = int((budget_mib * 2**20 - bounded) // per_cell)
    if tokens < 1:
        raise BudgetError(f"budget_mib={budget_mib} holds no token ({per_cell} bytes each"
                          + (f", beside {bounded / 2**20:.2f} MiB that do not grow)" if bounded else ")"))
    return tokens


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
