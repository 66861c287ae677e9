"""Soak: a long conversation at a small budget stays inside the budget at every step and does not
grow the process's memory. Marked slow (a few minutes on 2 cores); CI runs it.

``INFOKV_SOAK_TOKENS`` changes the length (default 20,000 generated tokens).
"""

from __future__ import annotations

import gc
import os
import time

import pytest

from infokv_local.engine import Engine
from infokv_local.llamacpp.sampling import SamplingParams

BUDGET, BUFFER = 256, 32
WARMUP = 2_000  # RSS is compared with what it was after this many tokens


def rss_mib() -> float:
    """Resident set size of this process (MiB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc (Linux)")
def test_soak_20000_tokens_at_budget_256_infokv(model):
    n_total = int(os.environ.get("INFOKV_SOAK_TOKENS", "20000"))
    assert n_total > WARMUP
    prompt = model.tokenize("Write a very long story about a lighthouse keeper, a storm and a lost ship.")
    figures: list[tuple[int, float, float]] = []
    n = calls = max_used = 0
    t0 = time.perf_counter()
    base = None
    with Engine(model, "infokv", budget=BUDGET, buffer=BUFFER) as eng:
        while n < n_total:
            # repeated generations continuing the same sequence (the last token of each stays pending)
            gen = eng.generate(prompt if calls == 0 else [], min(1000, n_total - n),
                               SamplingParams(temperature=0.8, seed=calls), ignore_eos=True)
            calls += 1
            for _ in gen:
                n += 1
                used = eng.used_cells
                max_used = max(max_used, used)
                assert used <= BUDGET + BUFFER, f"token {n}: {used} cells in use"
                if n % 2000 == 0:
                    gc.collect()
                    figures.append((n, rss_mib(), time.perf_counter() - t0))
                    if n == WARMUP:
                        base = figures[-1][1]
                    print(f"soak: {n} tokens, RSS {figures[-1][1]:.1f} MiB, {figures[-1][2]:.0f} s", flush=True)
        gc.collect()
        end = rss_mib()
        growth = (end - base) / base
        elapsed = time.perf_counter() - t0
        print(f"soak: {n} tokens in {elapsed:.0f} s ({n / elapsed:.1f} tok/s), {calls} calls; cells in use at most "
              f"{max_used} (budget {BUDGET} + buffer {BUFFER}); {eng.totals.evictions} compressions, "
              f"{eng.totals.evicted_tokens} tokens evicted; RSS {base:.1f} MiB after {WARMUP} tokens, {end:.1f} MiB "
              f"at the end ({100 * growth:+.2f}%); history {len(eng.totals.history)} steps, "
              f"{len(eng.totals._peaks)} peaks", flush=True)
        assert eng.totals.max_used_cells <= BUDGET + BUFFER
        assert eng.totals.evictions >= (n_total - BUDGET) // BUFFER - 1  # it did compress all along
        assert growth < 0.05, figures
