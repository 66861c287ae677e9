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
    return np.sort(best_first(s)[n_keep:])


def best_first(scores: np.ndarray) -> np.ndarray:
    """Indices of one-dimensional ``scores``, the token to keep first first: scored before NaN, then the
    higher score, then the older token (the smaller index)."""
    s = np.asarray(scores, dtype=np.float64)
    nan = np.isnan(s)
    return np.lexsort((np.arange(len(s)), -np.where(nan, 0.0, s), nan))  # lexsort's last key is the primary


def prompt_first(scores: np.ndarray, read: np.ndarray) -> np.ndarray:
    """Scores that rank every ``read`` token (True: read as a prompt) above every other token, and each group
    in the order :func:`best_first` gives ``scores``: the ranks (the best ``len(scores) - 1``), with
    ``len(scores)`` added for the read tokens."""
    s = np.asarray(scores, dtype=np.float64)
    r = np.asarray(read, dtype=bool)
    if s.ndim != 1 or r.shape != s.shape:
        raise ValueError(f"scores and read must be one per token (got shapes {s.shape} and {r.shape})")
    n = len(s)
    ranks = np.empty(n, dtype=np.float64)
    ranks[best_first(s)] = np.arange(n - 1, -1, -1, dtype=np.float64)
    return ranks + np.where(r, n, 0)


def number_runs(kinds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Which written number each token belongs to: a run id per token (``-1`` for a token of no number).

    ``kinds`` per token (in position order): 1 digits, 2 a "." or "," (part of a number only between
    digits), 0 anything else (:meth:`Model.number_kinds <infokv_local.llamacpp.model.Model.number_kinds>`). A run is
    digits at consecutive positions, joined across one separator; a gap in positions (an evicted token)
    ends it.
    """
    k = np.asarray(kinds)
    pos = np.asarray(positions)
    n = len(k)
    digit = k == 1
    joins = np.zeros(n, dtype=bool)  # token i continues the run of token i - 1
    if n > 1:
        adjacent = np.diff(pos) == 1
        joins[1:] = adjacent & digit[1:] & digit[:-1]
        if n > 2:
            # d . d: the separator and the digit after it continue the run
            sep = (k[1:-1] == 2) & digit[:-2] & digit[2:] & adjacent[:-1] & adjacent[1:]
            joins[1:-1] |= sep
            joins[2:] |= sep
    member = digit | ((k == 2) & joins)
    starts = member & ~joins
    ids = np.cumsum(starts) - 1
    return np.where(member, ids, -1)


def pool_runs(scores: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """Every token of a run scored as the run's best token, so a number is kept or evicted as a whole
    (tokens outside runs, ``-1``, keep their own score; NaN scores stay NaN only in runs of NaN)."""
    s = np.asarray(scores, dtype=np.float64).copy()
    r = np.asarray(runs)
    inside = r >= 0
    if not inside.any():
        return s
    best = np.full(int(r.max()) + 1, -np.inf)
    vals = np.where(np.isnan(s[inside]), -np.inf, s[inside])
    np.maximum.at(best, r[inside], vals)
    pooled = best[r[inside]]
    s[inside] = np.where(np.isneginf(pooled) & np.isnan(s[inside]), np.nan, pooled)
    return s


def whole_number_drops(scores: np.ndarray, n_keep: int, kinds: np.ndarray, positions: np.ndarray,
                       lo: int, hi: int) -> np.ndarray:
    """:func:`drop_order` for the evictable span ``[lo, hi)`` of a cache whose written numbers are kept or
    evicted whole: ``kinds`` and ``positions`` cover every cached token (in position order), ``scores`` the
    span. A number's tokens share its best score (:func:`pool_runs`); a number reaching into the protected
    sink or recent tokens is kept; a number cut by the keep boundary (equal scores) is dropped whole, so the
    cache may end a few tokens below its target."""
    runs = number_runs(kinds, positions)
    r = runs[lo:hi]
    s = pool_runs(scores, r)
    protected_runs = np.concatenate([runs[:lo], runs[hi:]])
    pinned = (r >= 0) & np.isin(r, protected_runs[protected_runs >= 0])
    s[pinned] = np.inf
    drop = drop_order(s, n_keep)
    cut = r[drop]
    cut = np.unique(cut[cut >= 0])
    return np.union1d(drop, np.flatnonzero(np.isin(r, cut) & ~pinned)).astype(np.int64)
