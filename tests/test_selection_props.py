"""Property tests of what a compression drops, for every policy, through the engine's own selection
functions (:mod:`infokv_local.policies.selection`): random cache layouts and random signals or scores."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from infokv_local.engine import Engine
from infokv_local.policies import ATTENTION, ENTROPY, KEYS, LAYER_DIST, POLICIES, ScoreInput, make_policy
from infokv_local.policies.selection import drop_order, evictable_span, keep_count, prompt_first

EVICTING = sorted(name for name, cls in POLICIES.items() if cls.evicts)
N_LAYER = 3


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """(n cached, n_sink, n_recent, target) as the engine meets them: target < n, target > sinks + recent."""
    n_sink = draw(st.integers(0, 8))
    n_recent = draw(st.integers(1, 40))
    target = draw(st.integers(n_sink + n_recent + 1, 300))
    n = draw(st.integers(target + 1, target + 200))
    return n, n_sink, n_recent, target


def signals(rng: np.random.Generator, positions: np.ndarray, n_keep: int, policy_needs: frozenset[str],
            with_gaps: bool) -> ScoreInput:
    n = len(positions)
    inp = ScoreInput(positions=positions, n_keep=n_keep, rng=np.random.default_rng(123))
    if ATTENTION in policy_needs:
        inp.attn_acc = rng.random((N_LAYER, n), dtype=np.float32) * rng.integers(1, 50)
        inp.attn_window = rng.random((N_LAYER, n), dtype=np.float32)
        inp.attn_current = rng.random((N_LAYER, n), dtype=np.float32)
        inp.window_rows = int(rng.integers(1, 33))
        if with_gaps:  # tokens that received no attention at all
            inp.attn_window[:, rng.random(n) < 0.3] = 0
    if ENTROPY in policy_needs:
        inp.entropy_produced = (rng.random(n) * 5).astype(np.float32)
        inp.entropy_at = (rng.random(n) * 5).astype(np.float32)
        if with_gaps:  # the sequence's first token has no producing distribution; decode rows have no "at"
            inp.entropy_produced[0] = np.nan
            inp.entropy_at[rng.random(n) < 0.5] = np.nan
    if LAYER_DIST in policy_needs:
        inp.layer_dist = rng.random((N_LAYER, n), dtype=np.float32)
    if KEYS in policy_needs:
        inp.keys = rng.standard_normal((N_LAYER, n, 2, 8)).astype(np.float32)
        if with_gaps:  # a zero key (no direction) and two tokens with the same key
            inp.keys[:, 0] = 0
            if n > 2:
                inp.keys[:, 2] = inp.keys[:, 1]
    return inp


def compress(policy_name: str, layout: tuple[int, int, int, int], seed: int, with_gaps: bool):
    """What the engine's _compress computes on these inputs: (kept positions, dropped positions, n_keep, lo, hi)."""
    n, n_sink, n_recent, target = layout
    pol = make_policy(policy_name)
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(np.arange(10 * n), size=n, replace=False)).astype(np.int64)  # holes of evictions
    lo, hi, n_keep = keep_count(n, target, n_sink, n_recent, pol.n_keep)
    if n_keep >= hi - lo:
        return positions, np.empty(0, dtype=np.int64), n_keep, lo, hi
    scores = np.asarray(pol.score(signals(rng, positions[lo:hi], n_keep, pol.needs, with_gaps)), dtype=np.float64)
    assert scores.shape == (hi - lo,)
    drop = drop_order(scores, n_keep)
    dropped = positions[lo:hi][drop]
    kept = np.setdiff1d(positions, dropped)
    return kept, dropped, n_keep, lo, hi


@pytest.mark.parametrize("policy", EVICTING)
@settings(max_examples=60, deadline=None, derandomize=True)
@given(layout=layouts(), seed=st.integers(0, 2**32 - 1), with_gaps=st.booleans())
def test_every_policy_keeps_exactly_the_target_and_never_the_protected(policy, layout, seed, with_gaps):
    n, n_sink, n_recent, target = layout
    kept, dropped, n_keep, lo, hi = compress(policy, layout, seed, with_gaps)
    positions_all = np.union1d(kept, dropped)
    assert len(positions_all) == n and len(np.intersect1d(kept, dropped)) == 0
    n_protected = n - (hi - lo)
    assert lo == min(n_sink, n) and hi - lo == max(n - n_sink - n_recent, 0)
    if policy == "context-shift":  # drops the older half of what is evictable (or more for the budget)
        ev = hi - lo
        assert len(kept) == n_protected + min(target - n_protected, ev - ev // 2)
        assert np.array_equal(dropped, positions_all[lo : lo + len(dropped)])  # the oldest ones
    else:
        assert len(kept) == max(target, n_protected) == target
    assert len(kept) <= target
    assert np.isin(positions_all[:lo], kept).all()  # sinks
    assert np.isin(positions_all[hi:], kept).all()  # recent window
    # deterministic for a seed (the random policy included: its generator comes with the input)
    again = compress(policy, layout, seed, with_gaps)
    assert np.array_equal(again[0], kept) and np.array_equal(again[1], dropped)


scores_with_specials = hnp.arrays(
    np.float64, st.integers(1, 200),
    elements=st.one_of(st.floats(-1e6, 1e6), st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1.0])),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(scores=scores_with_specials, data=st.data())
def test_drop_order_nan_first_then_lowest_ties_keep_the_older(scores, data):
    n_keep = data.draw(st.integers(0, len(scores) + 3))
    drop = drop_order(scores, n_keep)
    assert np.all(np.diff(drop) > 0)
    assert len(drop) == max(len(scores) - n_keep, 0)
    kept = np.setdiff1d(np.arange(len(scores)), drop)
    # reference: rank by (NaN last, higher score first, older first), keep the first n_keep
    ref = sorted(range(len(scores)), key=lambda i: (np.isnan(scores[i]), -scores[i] if not np.isnan(scores[i])
                                                     else 0.0, i))
    assert kept.tolist() == sorted(ref[:n_keep])
    if len(drop) and not np.isnan(scores[drop]).all():  # a scored token dropped: every NaN went first
        assert np.isin(np.flatnonzero(np.isnan(scores)), drop).all()
    if np.isposinf(scores).sum() <= n_keep:
        assert np.isin(np.flatnonzero(np.isposinf(scores)), kept).all()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(scores=scores_with_specials, data=st.data())
def test_prompt_first_keeps_read_tokens_first_each_group_in_its_own_order(scores, data):
    read = np.asarray(data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores))), dtype=bool)
    n_keep = data.draw(st.integers(0, len(scores)))
    kept = np.setdiff1d(np.arange(len(scores)), drop_order(prompt_first(scores, read), n_keep))
    n_read = int(read.sum())
    if n_keep <= n_read:  # only read tokens kept: the ones drop_order keeps among them
        inside = np.flatnonzero(read)
        assert kept.tolist() == sorted(inside[np.setdiff1d(np.arange(n_read), drop_order(scores[read], n_keep))])
    else:  # every read token, and the best of the others
        others = np.flatnonzero(~read)
        best = others[np.setdiff1d(np.arange(len(others)), drop_order(scores[~read], n_keep - n_read))]
        assert kept.tolist() == sorted(np.flatnonzero(read).tolist() + best.tolist())


def test_drop_order_refuses_bad_input():
    with pytest.raises(ValueError, match="one per token"):
        drop_order(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="n_keep"):
        drop_order(np.zeros(3), -1)


@given(n=st.integers(0, 500), n_sink=st.integers(0, 10), n_recent=st.integers(1, 64))
@settings(max_examples=200, derandomize=True)
def test_evictable_span_is_what_is_left_after_sinks_and_recent(n, n_sink, n_recent):
    lo, hi = evictable_span(n, n_sink, n_recent)
    assert 0 <= lo <= hi <= n
    assert lo == min(n_sink, n) and hi - lo == max(n - n_sink - n_recent, 0)


@pytest.mark.parametrize("policy", EVICTING)
@settings(max_examples=3, deadline=None, derandomize=True)
@given(budget=st.integers(24, 80), buffer=st.integers(12, 32), n_sink=st.integers(0, 6), n_recent=st.integers(1, 16))
def test_the_real_engine_keeps_its_invariants_for_random_sizes(model, tokens, policy, budget, buffer, n_sink,
                                                              n_recent):
    if budget < n_sink + n_recent + 1:
        budget = n_sink + n_recent + 1
    with Engine(model, policy, budget=budget, buffer=buffer, n_sink=n_sink, n_recent=n_recent,
                check_invariants=True) as eng:  # checks the budget and the protected tokens at every step
        eng.prefill(tokens[:160])
        _, pos = eng.ctx.cell_map()
        assert len(pos) <= budget + buffer
        assert pos[: min(n_sink, len(pos))].tolist() == list(range(min(n_sink, len(pos))))
        assert pos[-n_recent:].tolist() == list(range(160 - n_recent, 160))
        assert eng.totals.max_used_cells <= budget + buffer
