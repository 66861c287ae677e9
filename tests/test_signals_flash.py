"""Attention statistics with flash attention on (a separate softmax of the window rows) against the
explicit-softmax path on the same inputs, and the flash-attention choice per policy."""

from __future__ import annotations

import numpy as np
import pytest

from infokv_local.engine import Engine
from infokv_local.errors import CacheSettingsError, InfoKVError
from infokv_local.llamacpp.context import StatsContext


def _run(model, tokens, flash_attn, attn_all_rows, w=8):
    with StatsContext(model, n_ctx=512, n_batch=128, n_last_rows=w, flash_attn=flash_attn,
                      attn_all_rows=attn_all_rows) as ctx:
        ctx.decode(tokens[:70], 0)
        ctx.remove_cells([5, 17, 33, 34])  # holes: the next call refills some of them
        batch = ctx.decode(tokens[70:120], 70)
        step = ctx.decode([tokens[120]], 120)
        return batch, step, ctx.n_cells


@pytest.mark.parametrize("w", [8, 1, 64])
def test_window_mass_with_flash_attention_matches_the_explicit_softmax(model, tokens, w):
    ref_batch, ref_step, n_cells = _run(model, tokens, flash_attn=False, attn_all_rows=True, w=w)
    fa_batch, fa_step, _ = _run(model, tokens, flash_attn=True, attn_all_rows=False, w=w)
    n_layer, n_head = model.info.n_layer, model.info.n_head
    rows = min(w, 50)
    assert fa_batch.attn_last.shape == ref_batch.attn_last.shape == (n_layer, rows, n_cells)
    np.testing.assert_array_equal(fa_batch.cells, ref_batch.cells)
    # layer 0 sees the same queries and keys in both runs: the window softmax equals the explicit one
    np.testing.assert_allclose(fa_batch.attn_last[0], ref_batch.attn_last[0], atol=1e-4)
    np.testing.assert_allclose(fa_step.attn_last[0], ref_step.attn_last[0], atol=1e-4)
    # later layers differ only through the fused kernel's own rounding of the hidden states (measured:
    # correlation >= 0.999 per layer on these inputs, the same top cells)
    for a, b in ((fa_batch, ref_batch), (fa_step, ref_step)):
        for il in range(n_layer):
            assert np.corrcoef(a.attn_last[il].ravel(), b.attn_last[il].ravel())[0, 1] > 0.995, il
    score = lambda s: (s.attn_last.sum(axis=1) / s.attn_last.sum(axis=(1, 2))[:, None]).mean(0)[s.cells]  # noqa: E731
    k = len(fa_batch.cells) // 3
    top_fa, top_ref = set(np.argsort(-score(fa_batch))[:k]), set(np.argsort(-score(ref_batch))[:k])
    assert len(top_fa & top_ref) >= 0.9 * k
    # every window row is a distribution over the cache per head; attn_sum covers the window rows (documented)
    np.testing.assert_allclose(fa_batch.attn_last.sum(axis=(0, 2)), n_layer * n_head, rtol=1e-4)
    np.testing.assert_allclose(fa_batch.attn_sum, fa_batch.attn_last.sum(axis=1), atol=1e-4)
    np.testing.assert_allclose(fa_step.attn_sum, fa_step.attn_last[:, 0], atol=1e-6)
    free = np.setdiff1d(np.arange(n_cells), fa_batch.cells)
    assert not fa_batch.attn_last[:, :, free].any()


def test_all_rows_statistics_refuse_flash_attention(model):
    with pytest.raises(ValueError, match="flash attention off"):
        StatsContext(model, n_ctx=256, n_batch=64, flash_attn=True, attn_all_rows=True)


def test_policies_choose_flash_attention(model):
    with Engine(model, "snapkv", budget=64, buffer=16, flash_attn=True) as e:
        assert e.flash_attn == "on" and e.flash_attn_reason == "on: as asked (flash_attn=True)"
    with Engine(model, "infokv", budget=64, buffer=16) as e:
        if model.on_gpu:  # llama.cpp's own choice
            assert e.flash_attn == "auto" and e.flash_attn_reason.startswith("auto: llama.cpp's choice")
        else:  # on a CPU: the faster, timed on this machine
            assert e.flash_attn in ("on", "off", "split")
            assert e.flash_attn_reason.startswith(f"{e.flash_attn}: measured")
    with Engine(model, "h2o", budget=64, buffer=16) as e:
        assert e.flash_attn == "off" and "every query row" in e.flash_attn_reason
    with pytest.raises(CacheSettingsError, match="every query row"):
        Engine(model, "h2o", budget=64, buffer=16, flash_attn=True)
    for bad in ("off", 1):  # a string is not silently taken as True
        with pytest.raises(CacheSettingsError, match="flash_attn must be True, False, .split."):
            Engine(model, "infokv", budget=64, buffer=16, flash_attn=bad)


@pytest.mark.parametrize("policy", ["infokv", "snapkv", "tova"])
def test_generation_under_flash_attention_keeps_the_budget(model, tokens, policy):
    with Engine(model, policy, budget=64, buffer=16, flash_attn=True, check_invariants=True) as e:
        e.prefill(tokens[:150])
        assert e.totals.max_used_cells <= 80
        assert e.totals.evicted_tokens > 0


def test_quantized_cache_counts_its_bytes_and_keeps_the_budget(model, tokens):
    with Engine(model, "infokv", budget=64, buffer=16) as f16:
        per_cell_f16 = f16.kv_bytes_per_cell
    with Engine(model, "infokv", budget=64, buffer=16, cache_type_k="q8_0", cache_type_v="q8_0",
                check_invariants=True) as q8:
        assert q8.flash_attn == "on"  # a quantized V cache needs flash attention
        assert q8.kv_bytes_per_cell * 64 == per_cell_f16 * 34  # 34 bytes per 32 values instead of 64
        q8.prefill(tokens[:150])
        assert q8.totals.max_used_cells <= 80 and q8.totals.evicted_tokens > 0
    with Engine(model, "infokv", budget_mib=0.5, buffer=16, cache_type_k="q4_0", cache_type_v="q4_0") as q4:
        assert q4.budget == int(0.5 * 2**20 // q4.kv_bytes_per_cell)


def test_quantized_cache_refusals(model):
    with pytest.raises(InfoKVError, match="quantized V cache"):
        Engine(model, "h2o", budget=64, buffer=16, cache_type_v="q8_0")
    with pytest.raises(InfoKVError, match="quantized V cache"):
        Engine(model, "infokv", budget=64, buffer=16, cache_type_v="q4_0", flash_attn=False)
    with pytest.raises(CacheSettingsError, match="cache_type_k 'q3_k' is not"):
        Engine(model, "infokv", budget=64, buffer=16, cache_type_k="q3_k")


def test_command_line_cache_types_and_flash_attention():
    import json
    import subprocess
    import sys

    cli = [sys.executable, "-m", "infokv_local", "generate", "Once upon a time", "--raw", "--max-tokens", "8",
           "--budget", "48", "--buffer", "16", "--json"]
    res = subprocess.run([*cli, "--cache-type-k", "q8_0", "--cache-type-v", "q8_0"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    kv = json.loads(res.stdout)["kv"]
    assert (kv["cache_type_k"], kv["cache_type_v"], kv["flash_attn"]) == ("q8_0", "q8_0", "on")
    res = subprocess.run([*cli, "--policy", "h2o", "--cache-type-v", "q4_0"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "quantized V cache" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([*cli, "--flash-attn", "on", "--policy", "snapkv"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and json.loads(res.stdout)["kv"]["flash_attn"] == "on", res.stderr
