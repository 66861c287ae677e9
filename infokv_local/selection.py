"""Which cached tokens a compression drops: pure functions on positions and scores (no llama.cpp).

The engine compresses a cache of ``n`` tokens (in position order) down to ``target``: the ``n_sink``
first and ``n_recent`` last tokens are protected (:func:`evictable_span`), the policy decides how many
of the others to keep (:func:`keep_count`) and scores them, and :func:`drop_order` picks the drops.

Scores that are not numbers are handled deliberately, the same way for every policy:

- NaN means "no opinion": such tokens are evicted first (before any scored token), oldest kept first
  among them;
- ``-inf`` is the lowest score and ``+inf`` the highest (kept before anything else);
- ties are broken by position: the older token is kept.

So the result depends on the scores alone (and the random policy's seeded generator), never on the
order in which a sort happens to visit equal values.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def evictable_span(n: int, n_sink: int, n_recent: int) -> tuple[int, int]:
    """``[lo, hi)``: the cached tokens (in position order, ``n`` of them) that may be evicted."""
    lo = min(n_sink, n)
    return lo, max(n - n_recent, lo)


def keep_count(n: int, target: int, n_sink: int, n_recent: int,
               policy_n_keep: Callable[[int, int], int]) -> tuple[int, int, int]:
    """``(lo, hi, n_keep)``: the evictable span and how many of its tokens to keep to reach ``target``.

    The protected tokens always stay, so the cache ends with ``n - (hi - lo) + n_keep`` tokens, which is
    ``target`` unless the protected tokens alone exceed it. ``policy_n_keep(n_evictable, keep_target)``
    is the policy's say (context shift keeps fewer); it is clipped to ``[0, keep_target]``.
    """
    lo, hi = evictable_span(n, n_sink, n_recent)
    n_evictable = hi - lo
    keep_target = max(target - (n - n_evictable), 0)
    n_keep = int(np.clip(policy_n_keep(n_evictable, keep_target), 0, keep_target))
    return lo, hi, min(n_keep, n_evictable)


def drop_order(scores: np.ndarray, n_keep: int) -> np.ndarray:
    """Indices (ascending) into ``scores`` of the tokens to drop: all but the ``n_keep`` best.

    See the module's docstring for NaN, infinities and ties. Raises ``ValueError`` for a score array
    that is not one-dimensional or a negative ``n_keep``.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be one per token (got shape {s.shape})")
    if n_keep < 0:
        raise ValueError(f"n_keep must be >= 0 (got {n_keep})")
    if n_keep >= len(s):
        return np.empty(0, dtype=np.int64)
    nan = np.isnan(s)
    # best first: scored before NaN, then higher score, then older (smaller index); lexsort's last key is primary
    order = np.lexsort((np.arange(len(s)), -np.where(nan, 0.0, s), nan))
    return np.sort(order[n_keep:])
