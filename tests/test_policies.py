"""Pure-policy unit tests on arrays (no llama.cpp)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from infokv_local.policies import (
    POLICIES,
    ContextShiftPolicy,
    H2OPolicy,
    InfoKVPolicy,
    RandomPolicy,
    ScoreInput,
    SnapKVPolicy,
    StreamingPolicy,
    TOVAPolicy,
    make_policy,
)
from infokv_local.policies.snapkv import pool1d

N_LAYER, N = 3, 10


def inp(**kw) -> ScoreInput:
    base = dict(positions=np.arange(4, 4 + N), n_keep=5, rng=np.random.default_rng(0))
    base.update(kw)
    return ScoreInput(**base)


def test_registry_and_errors():
    assert set(POLICIES) == {"full", "streaming", "context-shift", "h2o", "snapkv", "tova", "random", "infokv",
                             "infokv-paper", "keydiff", "rkv", "infokv-rkv"}
    paper = make_policy("infokv-paper")
    assert (paper.mix, paper.alpha, paper.name) == ("paper", 0.9, "infokv-paper")
    assert (InfoKVPolicy().mix, InfoKVPolicy().alpha) == ("paper", 0.95)
    assert isinstance(make_policy("snapkv", kernel_size=3), SnapKVPolicy)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lru")
    with pytest.raises(ValueError, match="kernel_size must be a positive odd number"):
        SnapKVPolicy(kernel_size=4)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        InfoKVPolicy(alpha=1.5)
    with pytest.raises(ValueError, match="entropy must be 'produced' or 'at'"):
        InfoKVPolicy(entropy="future")
    with pytest.raises(ValueError, match="merge must be 'mean' or 'vote'"):
        InfoKVPolicy(merge="max")


def test_streaming_keeps_the_newest():
    s = StreamingPolicy().score(inp())
    assert np.argsort(-s)[:5].tolist() == [9, 8, 7, 6, 5]


def test_context_shift_drops_the_older_half():
    p = ContextShiftPolicy()
    assert p.n_keep(10, 8) == 5
    assert p.n_keep(10, 3) == 3  # never more than the budget needs
    assert np.argsort(-p.score(inp()))[:5].tolist() == [9, 8, 7, 6, 5]


def test_h2o_sums_accumulated_attention_over_layers():
    acc = np.zeros((N_LAYER, N))
    acc[0, 2] = 5.0
    acc[1, 7] = 3.0
    acc[2, 7] = 3.0
    s = H2OPolicy(recent_ratio=0.0).score(inp(attn_acc=acc))
    assert s.argmax() == 7 and s[2] == 5.0


def test_h2o_keeps_half_recent_half_heavy_hitters():
    acc = np.zeros((N_LAYER, N))
    acc[:, [0, 1, 2]] = [5.0, 4.0, 3.0]  # old heavy hitters
    s = H2OPolicy().score(inp(attn_acc=acc, n_keep=6))
    kept = set(np.argsort(-s)[:6].tolist())
    assert kept == {7, 8, 9, 0, 1, 2}  # the 3 newest and the 3 heaviest
    with pytest.raises(ValueError, match=r"recent_ratio must be in \[0, 1\]"):
        H2OPolicy(recent_ratio=2)


def test_tova_uses_the_current_query_only():
    cur = np.zeros((N_LAYER, N))
    cur[:, 4] = 1.0
    acc = np.ones((N_LAYER, N)) * 100
    s = TOVAPolicy().score(inp(attn_current=cur, attn_acc=acc))
    assert s.argmax() == 4


def test_pool1d():
    x = np.array([[0.0, 0, 1, 0, 0, 0, 2]])
    assert pool1d(x, 3, "max").tolist() == [[0, 1, 1, 1, 0, 2, 2]]
    np.testing.assert_allclose(pool1d(x, 3, "avg"), [[0, 1 / 3, 1 / 3, 1 / 3, 0, 2 / 3, 4 / 3]])
    assert pool1d(x, 1, "max") is x


def test_snapkv_pools_window_attention_to_keep_neighbours():
    win = np.zeros((N_LAYER, N))
    win[:, 5] = 1.0
    s = SnapKVPolicy(kernel_size=3).score(inp(attn_window=win))
    assert set(np.argsort(-s)[:3].tolist()) == {4, 5, 6}
    s1 = SnapKVPolicy(kernel_size=1).score(inp(attn_window=win))
    assert s1.argmax() == 5 and (s1 > 0).sum() == 1


def test_random_is_seeded():
    a = RandomPolicy().score(inp(rng=np.random.default_rng(1)))
    b = RandomPolicy().score(inp(rng=np.random.default_rng(1)))
    assert np.array_equal(a, b) and a.shape == (N,)


def infokv_inputs(attn_hot: int, entropy_hot: int) -> ScoreInput:
    win = np.full((N_LAYER, N), 0.01)
    win[:, attn_hot] = 1.0
    ent = np.full(N, 0.1)
    ent[entropy_hot] = 5.0
    dist = np.full((N_LAYER, N), 0.5)
    # a prompt chunk's compression, scored with ``mix`` and ``alpha`` (generation steps use decode_mix / decode_alpha)
    return inp(attn_window=win, entropy_produced=ent, entropy_at=ent[::-1].copy(), layer_dist=dist, n_keep=2,
               n_incoming=64)


def test_infokv_alpha_one_is_attention_only():
    i = infokv_inputs(attn_hot=1, entropy_hot=8)
    s = InfoKVPolicy(alpha=1.0).score(i)
    assert s.argmax() == 1


def test_infokv_alpha_zero_is_entropy_times_layer_change():
    i = infokv_inputs(attn_hot=1, entropy_hot=8)
    assert InfoKVPolicy(alpha=0.0).score(i).argmax() == 8
    # the "at" entropy is the reversed array here: its peak is at index 1
    assert InfoKVPolicy(alpha=0.0, entropy="at").score(i).argmax() == 1


def test_infokv_formula_per_layer():
    i = infokv_inputs(attn_hot=1, entropy_hot=8)
    p = make_policy("infokv-paper")  # alpha 0.9, tau 1, the paper's mix
    a = i.attn_window / i.attn_window.sum(axis=1, keepdims=True)
    e = (i.layer_dist + 1.0) * i.entropy_produced[None]
    soft = np.exp(e - e.max(axis=1, keepdims=True))
    soft /= soft.sum(axis=1, keepdims=True)
    expected = 0.9 * a + 0.1 * soft
    np.testing.assert_allclose(p.layer_scores(i), expected)
    np.testing.assert_allclose(p.score(i), expected.mean(axis=0))


def test_infokv_layer_change_matters():
    i = infokv_inputs(attn_hot=1, entropy_hot=8)
    i.entropy_produced[:] = 2.0
    i.layer_dist[:, 3] = 3.0  # the representation of token 3 changes the most
    assert InfoKVPolicy(alpha=0.0).score(i).argmax() == 3


def test_infokv_ablations_use_one_signal():
    i = infokv_inputs(attn_hot=1, entropy_hot=8)
    i.layer_dist[:, 3] = 3.0  # token 3's representation changes most; token 8 has the highest entropy
    ent = InfoKVPolicy(alpha=0.0, info="entropy", mix="paper").layer_scores(i)
    evo = InfoKVPolicy(alpha=0.0, info="evolution", mix="paper").layer_scores(i)
    h = i.entropy_produced
    np.testing.assert_allclose(ent, np.broadcast_to(np.exp(h) / np.exp(h).sum(), ent.shape))
    d = i.layer_dist + 1.0
    np.testing.assert_allclose(evo, np.exp(d) / np.exp(d).sum(axis=1, keepdims=True))
    assert ent.mean(axis=0).argmax() == 8 and evo.mean(axis=0).argmax() == 3
    with pytest.raises(ValueError, match="info must be"):
        InfoKVPolicy(info="attention")


def test_infokv_rank_mix_blends_two_rankings():
    from infokv_local.policies.infokv import rank_rows

    np.testing.assert_allclose(rank_rows(np.array([[3.0, 1.0, 2.0, 2.0]])), [[1.0, 0.0, 0.5, 0.5]])
    i = infokv_inputs(attn_hot=1, entropy_hot=8)
    i.entropy_produced[1] = 4.0  # token 1: top attention, second entropy; token 8: top entropy, low attention
    s = InfoKVPolicy(alpha=0.5, mix="rank").layer_scores(i)
    assert s.shape == i.attn_window.shape and 0.0 <= s.min() and s.max() <= 1.0
    assert s.mean(axis=0).argmax() == 1
    a = rank_rows(i.attn_window)
    e = rank_rows((i.layer_dist + 1.0) * i.entropy_produced[None])
    np.testing.assert_allclose(s, 0.5 * a + 0.5 * e)
    with pytest.raises(ValueError, match="mix must be"):
        InfoKVPolicy(mix="sum")


def test_infokv_vote_merge_counts_layers():
    i = infokv_inputs(attn_hot=1, entropy_hot=8)
    i.attn_window[0] = 0.01
    i.attn_window[0, 6] = 1.0  # one layer prefers token 6, two prefer token 1
    i.n_keep = 1
    s = InfoKVPolicy(alpha=1.0, merge="vote").score(i)
    assert s.argmax() == 1 and s[6] > s[0]


def test_infokv_tolerates_unknown_entropy():
    i = infokv_inputs(attn_hot=1, entropy_hot=8)
    i.entropy_produced[0] = np.nan
    assert np.isfinite(InfoKVPolicy().score(i)).all()


def test_infokv_pooling_and_alpha_one_ranks_like_snapkv():
    rng = np.random.default_rng(5)
    win = rng.random((N_LAYER, N)) ** 4
    i = infokv_inputs(attn_hot=1, entropy_hot=8)
    i.attn_window = win
    a = np.argsort(-InfoKVPolicy(alpha=1.0, kernel_size=3).score(i))
    b = np.argsort(-SnapKVPolicy(kernel_size=3).score(i))
    assert a[0] == b[0]
    with pytest.raises(ValueError, match="kernel_size must be a positive odd number"):
        InfoKVPolicy(kernel_size=2)


@given(st.integers(1, 4).flatmap(lambda r: st.integers(2, 12).flatmap(
    lambda n: st.lists(st.lists(st.integers(0, 4), min_size=n, max_size=n), min_size=r, max_size=r))))
def test_rank_rows_is_the_mean_rank_among_the_row(values):
    from infokv_local.policies.infokv import rank_rows

    x = np.array(values, dtype=np.float64)
    n = x.shape[1]
    # by definition: the values below, plus half of the other equal ones, over n - 1
    ref = np.array([[((r < v).sum() + ((r == v).sum() - 1) / 2) / (n - 1) for v in r] for r in x])
    np.testing.assert_allclose(rank_rows(x), ref)


def _signals(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return dict(attn_window=rng.random((N_LAYER, N)), layer_dist=rng.random((N_LAYER, N)) * 0.5,
                entropy_produced=rng.random(N) * 3, entropy_at=rng.random(N) * 3)


@given(st.integers(0, 10_000), st.integers(2, 512))
def test_decode_mix_applies_to_generation_steps_only(seed, chunk):
    default = InfoKVPolicy()  # the rank mix at 0.5 for generation steps, the paper's at 0.95 for prompt chunks
    one_mix = InfoKVPolicy(decode_mix=None, decode_alpha=None)  # the default before the split
    sig = _signals(seed)
    step, prompt = inp(n_incoming=1, **sig), inp(n_incoming=chunk, **sig)
    np.testing.assert_array_equal(default.score(step), InfoKVPolicy(mix="rank", alpha=0.5).score(step))
    np.testing.assert_array_equal(default.score(prompt), one_mix.score(prompt))
    np.testing.assert_array_equal(one_mix.score(step), one_mix.score(prompt))
    np.testing.assert_array_equal(make_policy("infokv:decode_mix=paper+decode_alpha=0.95").score(step),
                                  one_mix.score(step))
    assert InfoKVPolicy(decode_mix=None).mix_for(step) == ("paper", 0.5)
    assert InfoKVPolicy(decode_alpha=None).mix_for(step) == ("rank", 0.95)
    assert default.mix_for(prompt) == ("paper", 0.95)
    # one token's compression that reads a prompt's end (the window mostly prompt) is a prompt compression
    prompt_end = inp(n_incoming=1, window_generated=0.5, **sig)
    assert default.mix_for(prompt_end) == ("paper", 0.95)
    np.testing.assert_array_equal(default.score(prompt_end), one_mix.score(prompt))
    assert default.mix_for(inp(n_incoming=1, window_generated=0.53, **sig)) == ("rank", 0.5)
    assert default.mix_for(inp(n_incoming=chunk, window_generated=1.0, **sig)) == ("paper", 0.95)
    assert make_policy("infokv:decode_on=step").mix_for(prompt_end) == ("rank", 0.5)  # the rule until 30 Nov
    assert make_policy("infokv-paper").mix_for(step) == make_policy("infokv-paper").mix_for(prompt) == ("paper", 0.9)


@pytest.mark.parametrize("spec", ["infokv:decode_mix=softmax", "infokv:decode_alpha=2", "infokv:decode_alpha=x",
                                  "infokv:decode_on=sometimes"])
def test_bad_decode_mix_or_alpha_is_a_policy_error(spec):
    with pytest.raises(ValueError, match="decode_"):
        make_policy(spec)


def test_decode_mix_parses_from_a_spec():
    pol = make_policy("infokv:decode_mix=paper+decode_alpha=0.9")
    assert (pol.mix, pol.alpha, pol.decode_mix, pol.decode_alpha) == ("paper", 0.95, "paper", 0.9)
    assert (InfoKVPolicy().decode_mix, InfoKVPolicy().decode_alpha) == ("rank", 0.5)


# ---- written numbers kept or evicted whole (every policy's whole_numbers option) ------------------
def test_number_runs_join_digits_and_separators_between_digits_only():
    from infokv_local.policies.selection import number_runs

    #            x  4  9  .  5  0  x  ,  1  ,  2  x  .  7  7(gap)
    kinds = np.array([0, 1, 1, 2, 1, 1, 0, 2, 1, 2, 1, 0, 2, 1, 1])
    pos = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 20])
    assert number_runs(kinds, pos).tolist() == [-1, 0, 0, 0, 0, 0, -1, -1, 1, 1, 1, -1, -1, 2, 3]
    assert number_runs(np.array([], dtype=np.int8), np.array([], dtype=np.int64)).tolist() == []


def test_whole_number_drops_keep_or_drop_a_number_whole():
    from infokv_local.policies.selection import drop_order, pool_runs, whole_number_drops

    runs = np.array([-1, 0, 0, 0, -1, 1, 1])
    pooled = pool_runs(np.array([5.0, 0.1, 9.0, 0.2, 1.0, np.nan, np.nan]), runs)
    assert pooled[1:4].tolist() == [9.0, 9.0, 9.0] and np.isnan(pooled[5:]).all()
    # cached: sink s, then the span [1, 9), then a recent token r; a number "7 7" reaches into the recent token
    kinds = np.array([0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1])
    pos = np.arange(11)
    scores = np.array([3.0, 0.5, 0.1, 0.2, 4.0, 0.9, 0.05, 0.0, 0.3])  # the span: positions 1..9
    plain = drop_order(scores, 5)
    assert set(plain.tolist()) & {1, 2, 3} and not {1, 2, 3} <= set(plain.tolist())  # plain eviction splits 1 2 3
    drop = whole_number_drops(scores, 5, kinds, pos, 1, 10)
    runs_in_span = [[1, 2, 3], [5, 6], [8]]  # span indices of "1 2 3", "6 7" and the "9" of "9 10"
    for run in runs_in_span:
        assert set(run) <= set(drop.tolist()) or not set(run) & set(drop.tolist())
    assert 8 not in drop  # its number reaches into the protected recent token: kept
    assert len(drop) >= 4  # at least what plain eviction drops (more when a tie cuts a number)


def test_every_policy_takes_the_engine_switches_and_only_as_0_or_1():
    pol = make_policy("tova:keep_prompt=1+whole_numbers=1")
    assert (pol.keep_prompt, pol.whole_numbers) == (True, True)
    assert (make_policy("tova").keep_prompt, make_policy("tova:keep_prompt=0").keep_prompt) == (False, False)
    for bad in ("tova:keep_prompt=2", "tova:keep_prompt=1.0", "tova:whole_numbers=yes"):
        with pytest.raises(ValueError, match="must be 0 or 1"):
            make_policy(bad)
