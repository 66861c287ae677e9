"""Cell listing and O(k) removal by cell index through the patch, on the real model."""

from __future__ import annotations

import numpy as np
import pytest

from infokv_local.llamacpp.context import StatsContext


def make_ctx(model, **kw):
    kw.setdefault("n_ctx", 256)
    kw.setdefault("n_batch", 64)
    return StatsContext(model, attn=False, layer_dist=False, entropy_top_k=None, **kw)


def test_cell_map_is_ordered_by_position(model, tokens):
    with make_ctx(model) as ctx:
        ctx.decode(tokens[:60], 0)
        ctx.decode(tokens[60:120], 60)
        cells, pos = ctx.cell_map()
        assert pos.tolist() == list(range(120))
        assert len(set(cells.tolist())) == 120
        assert ctx.n_used == 120


def test_remove_scattered_cells_then_decode_reuses_them(model, tokens):
    with make_ctx(model) as ctx:
        ctx.decode(tokens[:60], 0)
        ctx.decode(tokens[60:120], 60)
        cells, pos = ctx.cell_map()
        victims = cells[[3, 10, 11, 50, 97]]
        assert ctx.remove_cells(victims) == 5

        cells2, pos2 = ctx.cell_map()
        assert not np.isin(victims, cells2).any()
        assert sorted(set(range(120)) - set(pos2.tolist())) == [3, 10, 11, 50, 97]
        assert ctx.n_used == 115

        sig = ctx.decode(tokens[120:123], 120)
        assert np.isfinite(ctx.logits(-1)).all()
        new = sig.cells[np.isin(sig.cell_pos, [120, 121, 122])]
        # freed cells are reused first
        assert set(new.tolist()) <= set(victims.tolist())
        assert ctx.n_used == 118


def test_removal_by_cell_equals_stock_removal_by_position(model, tokens):
    """Removing cells by index leaves the same cache as llama.cpp's own seq_rm by position."""
    from llama_cpp import llama_cpp as llama

    gone = [5, 6, 20]
    with make_ctx(model) as ctx:
        ctx.decode(tokens[:40], 0)
        cells, _ = ctx.cell_map()
        ctx.remove_cells(cells[gone])
        ctx.decode([tokens[40]], 40, all_outputs=False)
        evicted = ctx.logits(-1)
    with make_ctx(model) as ref:
        ref.decode(tokens[:40], 0)
        mem = llama.llama_get_memory(ref.ptr)
        for p in gone:
            assert llama.llama_memory_seq_rm(mem, 0, p, p + 1)
        ref.decode([tokens[40]], 40, all_outputs=False)
        expected = ref.logits(-1)
    with make_ctx(model) as full:
        full.decode(tokens[:41], 0, all_outputs=False)
        unevicted = full.logits(-1)
    np.testing.assert_array_equal(evicted, expected)
    assert np.abs(evicted - unevicted).max() > 1e-3  # the removal did change what the model sees


def test_bad_removal_changes_nothing(model, tokens):
    with make_ctx(model) as ctx:
        ctx.decode(tokens[:30], 0)
        cells, _ = ctx.cell_map()
        free_cell = int(np.setdiff1d(np.arange(ctx.n_cells), cells)[0])
        for bad in ([cells[2], ctx.n_cells], [cells[2], -1], [cells[2], free_cell]):
            with pytest.raises(ValueError, match="out of range or not in the sequence"):
                ctx.remove_cells(bad)
            assert ctx.n_used == 30
        ctx.remove_cells([cells[2]])
        with pytest.raises(ValueError, match="out of range or not in the sequence"):
            ctx.remove_cells([cells[2]])  # already removed
        assert ctx.n_used == 29


def test_full_cache_reports_cache_full(model, tokens):
    from infokv_local.llamacpp.context import CacheFull

    with make_ctx(model, n_ctx=256, n_batch=128) as ctx:
        ctx.decode(tokens[:128], 0)
        ctx.decode(tokens[128:256], 128)
        with pytest.raises(CacheFull, match="no free cells for 4 tokens"):
            ctx.decode(tokens[256:260], 256)
        assert ctx.n_used == 256
        cells, _ = ctx.cell_map()
        ctx.remove_cells(cells[10:14])
        ctx.decode(tokens[256:260], 256)  # fits after eviction
        assert ctx.n_used == 256
