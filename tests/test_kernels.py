"""The native top-k entropy kernel against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from infokv_local.llamacpp import kernels
from infokv_local.llamacpp.context import StatsContext


def numpy_topk_entropy(logits: np.ndarray, k: int) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if 0 < k < x.shape[-1]:
        x = -np.sort(-x, axis=-1)[:, :k]
    x = x - x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=-1, keepdims=True)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)


@pytest.mark.parametrize("k", [1, 2, 17, 256, 999])
def test_topk_entropy_matches_numpy(k):
    rng = np.random.default_rng(k)
    logits = (rng.standard_normal((7, 1000)) * 4).astype(np.float32)
    np.testing.assert_allclose(kernels.topk_entropy(logits, k), numpy_topk_entropy(logits, k), atol=1e-5)


def test_topk_entropy_with_k_vocab_is_full_entropy():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 3000)) * 3).astype(np.float32)
    full = numpy_topk_entropy(logits, 0)
    np.testing.assert_allclose(kernels.topk_entropy(logits, 3000), full, atol=1e-5)
    np.testing.assert_allclose(kernels.topk_entropy(logits, 0), full, atol=1e-5)
    np.testing.assert_allclose(kernels.topk_entropy(logits, 10**6), full, atol=1e-5)
    assert kernels.topk_entropy(logits, 1).max() == 0.0


def test_uniform_and_peaked_rows():
    uniform = np.zeros((1, 512), dtype=np.float32)
    np.testing.assert_allclose(kernels.topk_entropy(uniform, 256), np.log(256), atol=1e-5)
    peaked = np.full((1, 512), -1e4, dtype=np.float32)
    peaked[0, 3] = 0.0
    assert kernels.topk_entropy(peaked, 256)[0] == pytest.approx(0.0, abs=1e-6)


def test_kernel_on_real_logits_in_place(model, tokens):
    with StatsContext(model, n_ctx=256, n_batch=64, attn=False, layer_dist=False, entropy_top_k=256) as ctx:
        sig = ctx.decode(tokens[:40], 0)
        logits = ctx.logits_rows(40).copy()
    assert logits.shape == (40, model.info.n_vocab)
    np.testing.assert_allclose(sig.entropy_at, numpy_topk_entropy(logits, 256), atol=1e-5)
    np.testing.assert_allclose(kernels.topk_entropy(logits, 256), sig.entropy_at, atol=1e-6)
    np.testing.assert_allclose(kernels.topk_entropy(logits, model.info.n_vocab), numpy_topk_entropy(logits, 0),
                               atol=1e-5)


def test_large_vocabularies_take_the_threshold_path_exactly():
    """Vocabularies over 4,096 select the top k among values above a threshold guessed from a sample:
    exact whatever the row looks like (ties, values hidden between the sampled positions, -inf), and the
    same with any number of threads."""
    rng = np.random.default_rng(3)
    n_vocab = 49152  # SmolLM2's; the sample takes every 24th value
    rows = [
        rng.standard_normal(n_vocab) * 4,
        rng.integers(0, 4, n_vocab).astype(float),  # thousands of ties at the top
        np.zeros(n_vocab),  # all equal: fewer than k above any guess but the value itself
        np.where(np.arange(n_vocab) % 24 == 5, 10.0, 0.0) + rng.standard_normal(n_vocab) * 0.01,  # unsampled peaks
        np.where(rng.random(n_vocab) < 0.5, -np.inf, rng.standard_normal(n_vocab)),
        np.linspace(-30, 5, n_vocab)[::-1],
    ]
    logits = np.stack(rows).astype(np.float32)
    for k in (1, 40, 256, 3000):
        want = numpy_topk_entropy(logits, k)
        for threads in (1, 2, 5):
            np.testing.assert_allclose(kernels.topk_entropy(logits, k, n_threads=threads), want, atol=2e-5)
    many = np.repeat(logits, 20, axis=0)  # 120 rows: split over up to 7 workers
    np.testing.assert_array_equal(kernels.topk_entropy(many, 256, n_threads=4), kernels.topk_entropy(many, 256))
