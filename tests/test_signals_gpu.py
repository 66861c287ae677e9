"""The statistics computed on a GPU against the CPU's, on the same tokens (the GPU check runs this with
``INFOKV_TEST_GPU_LAYERS``; without layers on a GPU there is nothing to compare and it is skipped).

The two backends run different kernels (another summation order, other precision in the products), so the
figures agree to a tolerance, not bit for bit. The tolerances (attention mass 1e-3 + 2% relatively, layer
distances 1e-2, entropies 2e-2 nats) are about four times the differences between two CPU kernels, flash
attention on against off, on the GPU check's random-weight SmolLM2 (2.8e-4, 2.5e-3 and 2.4e-4): the nearest
change of kernels measurable without a GPU. The real SmolLM2 is far more sensitive (0.3, 0.016 and 0.24
between those CPU kernels), so on it this comparison says little.
"""

from __future__ import annotations

import numpy as np
import pytest

from infokv_local.llamacpp.context import StatsContext
from infokv_local.llamacpp.model import Model


def _signals(model: Model, tokens: list[int], flash_attn: bool) -> list:
    with StatsContext(model, n_ctx=512, n_batch=256, n_last_rows=16, entropy_top_k=256,
                      flash_attn=flash_attn, attn_all_rows=not flash_attn) as ctx:
        prompt = ctx.decode(tokens[:200], 0)
        ctx.remove_cells([3, 50, 51, 120])
        step = ctx.decode([tokens[200]], 200)
        return [prompt, step]


@pytest.mark.parametrize("flash_attn", [False, True])
def test_gpu_statistics_match_the_cpu(model, model_path, tokens, flash_attn):
    if not model.on_gpu:
        pytest.skip("no layer on a GPU (set INFOKV_TEST_GPU_LAYERS with a GPU build)")
    on_gpu = _signals(model, tokens, flash_attn)
    with Model(model_path) as cpu_model:
        on_cpu = _signals(cpu_model, tokens, flash_attn)
    for g, c in zip(on_gpu, on_cpu, strict=True):
        np.testing.assert_array_equal(g.cells, c.cells)
        if not flash_attn:  # the sum over every query row exists only with the explicit softmax
            np.testing.assert_allclose(g.attn_sum, c.attn_sum, rtol=2e-2, atol=1e-3)
        np.testing.assert_allclose(g.attn_last, c.attn_last, rtol=2e-2, atol=1e-3)
        ok = ~np.isnan(c.layer_dist)
        np.testing.assert_array_equal(ok, ~np.isnan(g.layer_dist))
        np.testing.assert_allclose(g.layer_dist[ok], c.layer_dist[ok], atol=1e-2)
        ok = ~np.isnan(c.entropy_at)
        np.testing.assert_allclose(g.entropy_at[ok], c.entropy_at[ok], atol=2e-2)
