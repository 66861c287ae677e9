#!/usr/bin/env python3
# Run from the repository root: python results/power-mcnemar.py (numpy only).
# Ad hoc: power of the exact two-sided McNemar test at 0.05 to separate a 4-point difference in accuracy, given
# the share of questions on which two policies part (discordance), by simulation (2,000 runs each, seed 0).
import math
import numpy as np
rng = np.random.default_rng(0)
def p_exact(w, m):
    k = min(w, m - w)
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m) if m else 1.0
for d in (0.10, 0.18, 0.21):
    for n in (300, 600, 900):
        hits = 0
        for _ in range(2000):
            k = rng.binomial(n, d)
            w = rng.binomial(k, (d + 0.04) / (2 * d))
            hits += p_exact(w, k) < 0.05
        print(f"discordance {d:.2f} n {n}: power {hits/2000:.2f}")
