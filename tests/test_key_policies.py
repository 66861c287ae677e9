"""The policies that score by the cached keys (KeyDiff, R-KV, InfoKV with R-KV's redundancy term), on arrays:
the similarity helpers against their definitions written out, and what each policy keeps."""

from __future__ import annotations

import numpy as np
import pytest

from infokv_local.errors import PolicyError
from infokv_local.policies import (
    InfoKVPolicy,
    InfoKVRedundancyPolicy,
    KeyDiffPolicy,
    RKVPolicy,
    ScoreInput,
    make_policy,
)
from infokv_local.policies.base import layer_normalised
from infokv_local.policies.key_similarity import anchor_similarity, mean_similarity, redundancy
from infokv_local.policies.snapkv import pool1d

RNG = np.random.default_rng(7)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_mean_similarity_is_the_similarity_matrix_without_its_diagonal() -> None:
    keys = RNG.standard_normal((3, 9, 2, 16))
    got = mean_similarity(keys)
    for layer in range(3):
        for head in range(2):
            u = _unit(keys[layer, :, head])
            sim = u @ u.T
            np.fill_diagonal(sim, 0.0)
            np.testing.assert_allclose(got[layer, head], sim.sum(axis=1) / 8, atol=1e-12)


def test_anchor_similarity_is_the_cosine_to_the_mean_unit_key() -> None:
    keys = RNG.standard_normal((2, 7, 3, 8))
    got = anchor_similarity(keys)
    for layer in range(2):
        cos = [(_unit(keys[layer, :, h]) @ _unit(_unit(keys[layer, :, h]).mean(axis=0))) for h in range(3)]
        np.testing.assert_allclose(got[layer], np.mean(cos, axis=0), atol=1e-12)


def test_redundancy_is_a_distribution_per_layer_and_a_zero_key_is_harmless() -> None:
    keys = RNG.standard_normal((2, 6, 2, 4))
    keys[:, 3] = 0.0
    r = redundancy(keys)
    assert r.shape == (2, 6) and np.all(np.isfinite(r))
    np.testing.assert_allclose(r.sum(axis=1), 1.0)
    assert mean_similarity(keys[:, :1]).shape == (2, 2, 1)  # one token: no others to be like


def _repeated_keys(n: int = 8) -> np.ndarray:
    """n tokens whose keys all point one way (a repeated phrase), but token 5, which points elsewhere."""
    base = RNG.standard_normal(16)
    keys = np.tile(base, (2, n, 1, 1)) + 0.01 * RNG.standard_normal((2, n, 1, 16))
    keys[:, 5, 0] = RNG.standard_normal((2, 16))
    return keys


def test_keydiff_keeps_the_distinctive_key() -> None:
    inp = ScoreInput(positions=np.arange(8), n_keep=1, keys=_repeated_keys())
    assert int(np.argmax(KeyDiffPolicy().score(inp))) == 5


def test_rkv_prefers_the_distinctive_token_at_equal_attention_and_follows_attention_alone_at_lam_1() -> None:
    window = np.ones((2, 8))
    inp = ScoreInput(positions=np.arange(8), n_keep=1, keys=_repeated_keys(), attn_window=window)
    assert int(np.argmax(RKVPolicy().score(inp))) == 5
    inp.attn_window = RNG.random((2, 8))
    pooled = layer_normalised(pool1d(layer_normalised(inp.attn_window), 7, "max"))  # SnapKV's window, a distribution
    np.testing.assert_allclose(RKVPolicy(lam=1.0).score(inp), pooled.mean(axis=0), rtol=1e-12)
    with pytest.raises(PolicyError, match=r"lam must be a number in \[0, 1\]"):
        RKVPolicy(lam=2)
    with pytest.raises(PolicyError, match="kernel_size must be a positive odd number"):
        make_policy("rkv:kernel_size=4")


def _infokv_input(keys: np.ndarray, n_incoming: int = 1) -> ScoreInput:
    n = keys.shape[1]
    return ScoreInput(positions=np.arange(n), n_keep=2, n_incoming=n_incoming, keys=keys,
                      attn_window=RNG.random((2, n)), layer_dist=RNG.random((2, n)),
                      entropy_produced=RNG.random(n) * 3, entropy_at=RNG.random(n) * 3)


@pytest.mark.parametrize("n_incoming", [1, 64])  # a generation step (rank mix) and a prompt chunk (paper's mix)
def test_infokv_redundancy_term(n_incoming: int) -> None:
    keys = _repeated_keys()
    inp = _infokv_input(keys, n_incoming)
    plain = InfoKVPolicy().score(inp)
    # no redundancy: the same scores as InfoKV; some: the distinctive token gains on the others
    np.testing.assert_allclose(InfoKVRedundancyPolicy(redundancy=0.0).score(inp), plain)
    with_r = InfoKVRedundancyPolicy(redundancy=0.9).score(inp)
    others = [i for i in range(8) if i != 5]
    assert with_r[5] - with_r[others].max() > plain[5] - plain[others].max()
    # keys of fewer layers than the statistics (a sliding-window model's full-attention layers): their mean
    inp.keys = keys[:1]
    assert InfoKVRedundancyPolicy().score(inp).shape == (8,)


def test_infokv_names_the_policy_that_reads_keys() -> None:
    assert make_policy("infokv-rkv").redundancy == 0.75 and "keys" in make_policy("infokv-rkv").needs
    assert "keys" not in make_policy("infokv").needs
    with pytest.raises(PolicyError, match="infokv-rkv:redundancy=0.3"):
        make_policy("infokv:redundancy=0.3")
    with pytest.raises(PolicyError, match=r"redundancy must be a number in \[0, 1\]"):
        make_policy("infokv-rkv:redundancy=1.5")


def test_a_key_policy_without_keys_says_so() -> None:
    with pytest.raises(ValueError, match="needs the 'keys' signal"):
        KeyDiffPolicy().score(ScoreInput(positions=np.arange(3), n_keep=1))
