"""The patch's in-graph statistics against the eval-callback route on the real model."""

from __future__ import annotations

import numpy as np

from infokv_local.llamacpp.context import StatsContext
from infokv_local.llamacpp.tensor_tap import TensorTap


def test_attention_mass_matches_kq_soft_max(model, tokens):
    n_layer, n_head = model.info.n_layer, model.info.n_head
    w = 8
    tap = TensorTap(("kq_soft_max-",))
    with StatsContext(model, n_ctx=512, n_batch=128, n_last_rows=w, eval_callback=tap.callback) as ctx:
        ctx.decode(tokens[:70], 0)
        ctx.remove_cells([5, 17, 33, 34])  # scattered holes: the next call refills some of them
        tap.clear()
        sig = ctx.decode(tokens[70:120], 70)

    n_tok = 50
    assert sig.attn_sum.shape == (n_layer, ctx.n_cells)
    assert sig.attn_last.shape == (n_layer, w, ctx.n_cells)
    for il in range(n_layer):
        (kq,) = tap.tensors[f"kq_soft_max-{il}"]  # numpy order: [n_stream, n_head, n_tokens, n_kv]
        kq = kq.astype(np.float64)  # exact reference sums
        assert kq.shape[1:3] == (n_head, n_tok)
        n_kv = kq.shape[-1]
        ref_sum = kq.sum(axis=(0, 1, 2))
        ref_last = kq.sum(axis=(0, 1))[-w:]
        assert np.abs(sig.attn_sum[il, :n_kv] - ref_sum).max() < 1e-4
        assert np.abs(sig.attn_last[il, :, :n_kv] - ref_last).max() < 1e-4
        assert not sig.attn_sum[il, n_kv:].any()

    # every query row's softmax sums to one per head and layer
    np.testing.assert_allclose(sig.attn_last.sum(axis=(0, 2)), n_layer * n_head, rtol=1e-5)
    np.testing.assert_allclose(sig.attn_sum.sum(), n_tok * n_layer * n_head, rtol=1e-5)
    # cells that hold no token of the sequence receive no attention
    free = np.setdiff1d(np.arange(ctx.n_cells), sig.cells)
    assert not sig.attn_sum[:, free].any()


def test_decode_step_attention_rows(model, tokens):
    with StatsContext(model, n_ctx=256, n_batch=64, n_last_rows=16) as ctx:
        ctx.decode(tokens[:40], 0)
        sig = ctx.decode([tokens[40]], 40)
    # a one-token call has one query row
    assert sig.attn_last.shape[1] == 1
    np.testing.assert_allclose(sig.attn_last[:, 0].sum(), model.info.n_layer * model.info.n_head, rtol=1e-5)
    np.testing.assert_allclose(sig.attn_last[:, 0], sig.attn_sum, atol=1e-6)


def test_layer_distances_match_l_out(model, tokens):
    n_layer, n_embd = model.info.n_layer, model.info.n_embd
    tap = TensorTap(("l_out-",))
    with StatsContext(model, n_ctx=256, n_batch=128, attn=False, eval_callback=tap.callback) as ctx:
        sig = ctx.decode(tokens[:90], 0)
    last = tap.tensors[f"l_out-{n_layer - 1}"][0].reshape(90, n_embd).astype(np.float64)
    for il in range(n_layer):
        x = tap.tensors[f"l_out-{il}"][0].reshape(90, n_embd).astype(np.float64)
        cos = (x * last).sum(1) / np.sqrt((x * x).sum(1) * (last * last).sum(1))
        assert np.abs(sig.layer_dist[il] - (1.0 - cos)).max() < 1e-4
    assert np.all(sig.layer_dist[-1] == 0)
    assert sig.attn_sum is None and sig.attn_last is None


def test_layer_distances_only_for_output_tokens(model, tokens):
    with StatsContext(model, n_ctx=256, n_batch=64) as ctx:
        every = ctx.decode(tokens[:30], 0)
        ctx.clear()
        sig = ctx.decode(tokens[:30], 0, all_outputs=False)
    assert sig.layer_dist.shape == (model.info.n_layer, 30)
    # the last token is the call's only output: its distances are measured (the earlier layers' rows taken
    # with llama.cpp's out_ids), the others' are not
    assert np.isnan(sig.layer_dist[:, :-1]).all()
    np.testing.assert_allclose(sig.layer_dist[:, -1], every.layer_dist[:, -1], atol=1e-5)
    # the last token's own entropy is still known; the others are not
    assert np.isfinite(sig.entropy_at[-1]) and np.isnan(sig.entropy_at[:-1]).all()


def test_entropy_produced_is_previous_position(model, tokens):
    with StatsContext(model, n_ctx=256, n_batch=64, attn=False, layer_dist=False) as ctx:
        a = ctx.decode(tokens[:20], 0)
        b = ctx.decode(tokens[20:30], 20)
    assert np.isnan(a.entropy_produced[0])
    np.testing.assert_array_equal(a.entropy_produced[1:], a.entropy_at[:-1])
    assert b.entropy_produced[0] == a.entropy_at[-1]


def test_statistics_off_report_nothing(model, tokens):
    with StatsContext(model, n_ctx=256, n_batch=64, attn=False, layer_dist=False, entropy_top_k=None) as ctx:
        sig = ctx.decode(tokens[:10], 0)
    assert sig.attn_sum is None and sig.attn_last is None and sig.layer_dist is None
    assert sig.entropy_at is None and sig.entropy_produced is None
    assert sig.cells.size == 10
