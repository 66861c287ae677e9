"""Intervals for small-sample accuracy comparisons.

- ``wilson``: the Wilson score interval of a binomial proportion (Wilson, 1927), which stays inside
  [0, 1] and behaves at 0/n and n/n where the normal approximation does not.
- ``paired_bootstrap``: percentile bootstrap interval of the mean paired difference (same questions
  answered under two settings), resampling questions.
- ``mcnemar_exact``: two-sided exact McNemar test: under no difference, the discordant pairs split
  as Binomial(b + c, 1/2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% (by default) Wilson score interval of k successes in n trials; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n (got k={k}, n={n})")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Mean of a - b over pairs and its percentile bootstrap interval: ``(mean, lo, hi)``."""
    x = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or len(a) != len(b):
        raise ValueError("a and b must be 1-D and of the same length")
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """Discordant counts (a right & b wrong, a wrong & b right) and the two-sided exact p-value."""
    if len(a) != len(b):
        raise ValueError("a and b must have the same length")
    n10 = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    n01 = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    m = n10 + n01
    if m == 0:
        return n10, n01, 1.0
    k = min(n10, n01)
    p = 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return n10, n01, min(1.0, p)
