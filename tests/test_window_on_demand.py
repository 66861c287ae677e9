"""Attention statistics on demand: the engine builds the observation window only in the decode steps a
compression reads, and the evictions are the ones it makes with the statistics at every step."""

from __future__ import annotations

import numpy as np
import pytest

from infokv_local.engine import Engine
from infokv_local.llamacpp.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def _run(model, policy: str, on_demand: bool, turns: list[tuple[list[int], int]], flash_attn: bool | None,
         **kw) -> tuple[Engine, list[list[int]], list[list[int]]]:
    e = Engine(model, policy=policy, budget=72, buffer=40, n_threads=2, window=16, flash_attn=flash_attn,
               check_invariants=True, **kw)
    e.compressor.window_on_demand = e.compressor.window_on_demand and on_demand
    texts, evicted = [], []
    for prompt, n in turns:
        texts.append(list(e.generate(prompt, max_tokens=n, sampling=GREEDY, ignore_eos=True)))
    for st in e.totals.history:
        evicted.append(sorted(st.evicted_positions))
    return e, texts, evicted


@pytest.mark.parametrize("policy", ["infokv", "snapkv", "tova"])
@pytest.mark.parametrize("flash_attn", [False, True])
def test_window_on_demand_evicts_as_statistics_at_every_step(model, tokens, policy, flash_attn):
    # a generation through several compressions: the steps that skip the statistics change nothing
    turns = [(tokens[:50], 150)]
    ref, ref_text, ref_ev = _run(model, policy, False, turns, flash_attn)
    got, got_text, got_ev = _run(model, policy, True, turns, flash_attn)
    assert got.compressor.window_on_demand and not ref.compressor.window_on_demand
    assert got_text == ref_text
    assert got_ev == ref_ev
    assert sum(1 for ev in got_ev if ev) >= 3
    assert got.window_refreshes == 0
    for e in (ref, got):
        e.close()


@pytest.mark.parametrize("policy", ["infokv", "snapkv"])
def test_a_prompt_after_an_early_stop_records_the_window_first(model, tokens, policy):
    # the second turn's prompt arrives when the cache is not full: its first chunk compresses right
    # after steps that skipped the statistics, so the engine decodes those tokens again with them on.
    # A batch decode differs from token-by-token decodes in the last bits, so the window's mass is
    # compared with a tolerance and the eviction it leads to must be the same.
    rings, evictions = {}, {}
    for on_demand in (False, True):
        # the ring's window is compared: no prompt probe (it would score the prompt's compression with its own)
        e = Engine(model, policy=policy, budget=72, buffer=40, n_threads=2, window=16, check_invariants=True,
                   prompt_probe=False)
        e.compressor.window_on_demand = e.compressor.window_on_demand and on_demand
        list(e.generate(tokens[:50], max_tokens=70, sampling=GREEDY, ignore_eos=True))
        compress = e.compressor.compress

        def spy(target, n_incoming=1, *, e=e, compress=compress, key=on_demand):
            cells, pos = e.ctx.cell_map()
            rings.setdefault(key, e.cells.ring[: e.cells.ring_len][:, :, cells].sum(axis=(0, 1)))
            return compress(target, n_incoming)

        e.compressor.compress = spy
        before = e.totals.steps
        list(e.generate(tokens[200:260], max_tokens=1, sampling=GREEDY, ignore_eos=True))
        evictions[on_demand] = [sorted(st.evicted_positions) for st in list(e.totals.history)[before:]]
        assert e.window_refreshes == (1 if on_demand else 0)
        e.close()
    np.testing.assert_allclose(rings[True], rings[False], rtol=2e-2, atol=1e-3)
    assert evictions[True] == evictions[False] and any(evictions[True])


def test_window_on_demand_skips_most_decode_steps(model, tokens):
    e = Engine(model, policy="snapkv", budget=72, buffer=40, n_threads=2, window=16, check_invariants=True)
    seen: list[tuple[bool, bool]] = []
    decode = e.ctx.decode

    def spy(part, start_pos, all_outputs=True, **kw):
        free_after = e.capacity - e.ctx.n_used - len(part)
        sig = decode(part, start_pos, all_outputs=all_outputs, **kw)
        if len(part) == 1:
            seen.append((sig.attn_last is not None, free_after < e.window))
        return sig

    e.ctx.decode = spy
    list(e.generate(tokens[:40], max_tokens=150, sampling=GREEDY, ignore_eos=True))
    assert e.totals.evictions >= 2
    e.close()
    # a single-token step has the window exactly when it is one of the 16 before the cache is full
    assert all(got == want for got, want in seen)
    assert 0 < sum(got for got, _ in seen) < len(seen) / 2


def test_h2o_keeps_statistics_at_every_step(model, tokens):
    e = Engine(model, policy="h2o", budget=72, buffer=40, n_threads=2, window=16)
    assert not e.compressor.window_on_demand
    list(e.generate(tokens[:40], max_tokens=60, sampling=GREEDY, ignore_eos=True))
    assert e.last_signals is not None and e.last_signals.attn_sum is not None
    e.close()


def test_snapshot_keeps_the_unrecorded_count(model, tokens):
    e = Engine(model, policy="infokv", budget=72, buffer=40, n_threads=2, window=16)
    list(e.generate(tokens[:40], max_tokens=50, sampling=GREEDY, ignore_eos=True))
    snap = e.snapshot()
    assert snap.unrecorded == e.compressor.unrecorded
    other = Engine(model, policy="infokv", budget=72, buffer=40, n_threads=2, window=16)
    other.restore(snap)
    assert other.compressor.unrecorded == e.compressor.unrecorded
    a = list(e.generate(tokens[300:340], max_tokens=20, sampling=GREEDY, ignore_eos=True))
    b = list(other.generate(tokens[300:340], max_tokens=20, sampling=GREEDY, ignore_eos=True))
    assert a == b
    for x in (e, other):
        x.close()


@pytest.mark.parametrize("policy", ["infokv", "snapkv"])
def test_a_prompt_that_fits_with_room_is_read_without_the_window(model, tokens, policy):
    """A prompt batch records attention rows only when a compression may read them: when fewer than
    ``window`` cells stay free once it and the rest of the prompt are cached."""
    e = Engine(model, policy=policy, budget=72, buffer=40, n_threads=2, window=16, check_invariants=True,
               prompt_probe=False)
    seen = []
    decode = e.ctx.decode

    def spy(part, start_pos, all_outputs=True, **kw):
        spare = e.capacity - e.ctx.n_used - len(part) - e.compressor.following
        sig = decode(part, start_pos, all_outputs=all_outputs, **kw)
        if len(part) > 1:
            seen.append((len(part), sig.attn_last is not None, spare < e.window))
        return sig

    e.ctx.decode = spy
    list(e.generate(tokens[:60], max_tokens=1, sampling=GREEDY, ignore_eos=True))  # 60 of 112 cells
    list(e.generate(tokens[100:190], max_tokens=1, sampling=GREEDY, ignore_eos=True))  # 90 more: compressions
    e.close()
    assert seen[0] == (60, False, False)
    assert all(got == want for _, got, want in seen)
    assert any(got for _, got, _ in seen[1:])
