"""The cached keys the key-scoring policies read (patch 10: llama_infokv_get_keys), on the real model: equal to
the keys the graph computed (the eval-callback route), in a quantized cache too, per stream with several
sequences; and engines with those policies keep the budget."""

from __future__ import annotations

import numpy as np
import pytest

from infokv_local.engine import Engine
from infokv_local.llamacpp.context import StatsContext
from infokv_local.llamacpp.sampling import SamplingParams
from infokv_local.llamacpp.tensor_tap import TensorTap

TEXT = ("The lighthouse keeper counted the ships every night. Seven ships passed on Monday, nine on Tuesday, and "
        "on Wednesday a storm kept every ship in the harbour while the keeper wrote letters to his sister.")


def _graph_keys(model, tokens: list[int], **kw) -> tuple[np.ndarray, np.ndarray, dict[str, list[np.ndarray]]]:
    tap = TensorTap(("Kcur-",))
    with StatsContext(model, n_ctx=256, n_batch=128, attn=False, layer_dist=False, eval_callback=tap.callback,
                      **kw) as ctx:
        ctx.decode(tokens, 0, all_outputs=False)
        cells, pos = ctx.cell_map()
        keys = ctx.read_keys(cells)
        assert list(ctx.key_layers()) == list(range(model.info.n_layer))
    return keys, pos, tap.tensors


def test_read_keys_are_the_keys_the_graph_computed(model) -> None:
    tokens = model.tokenize(TEXT)
    keys, pos, graph = _graph_keys(model, tokens)
    n_head_kv = model.info.n_head_kv
    assert keys.shape[:3] == (model.info.n_layer, len(tokens), n_head_kv) and keys.dtype == np.float32
    for il in range(model.info.n_layer):
        ref = graph[f"Kcur-{il}"][-1]  # the last tensor of that name: after RoPE, [1, tokens, KV heads, head size]
        ref = ref.reshape(len(tokens), n_head_kv, -1)[pos]
        np.testing.assert_allclose(keys[il], ref, rtol=0, atol=2e-3 * np.abs(ref).max())  # stored as f16


def test_read_keys_of_a_quantized_cache_keep_what_the_policies_use(model) -> None:
    """llama.cpp stores a quantized K cache rotated (a Hadamard transform per head, attn_rot_k), so the keys read
    back are in another basis; norms and the cosine similarities between keys, all the policies use, are kept."""
    tokens = model.tokenize(TEXT)
    exact, _, _ = _graph_keys(model, tokens)
    q8, _, _ = _graph_keys(model, tokens, cache_type_k="q8_0", flash_attn=True)
    norm_e, norm_q = np.linalg.norm(exact, axis=-1), np.linalg.norm(q8, axis=-1)
    assert np.abs(norm_q - norm_e).max() <= 0.03 * norm_e.max()
    unit_e, unit_q = exact / norm_e[..., None], q8 / norm_q[..., None]
    cos_e = np.einsum("lihd,ljhd->lhij", unit_e, unit_e)
    cos_q = np.einsum("lihd,ljhd->lhij", unit_q, unit_q)
    assert np.abs(cos_q - cos_e).max() < 0.03
    assert np.abs(q8 - exact).max() > 0.1 * np.abs(exact).max()  # the basis did change: this checks the rotation


def test_read_keys_per_stream_and_bad_cells(model) -> None:
    a, b = model.tokenize(TEXT)[:20], model.tokenize("A different sentence about the sea.")
    with StatsContext(model, n_ctx=256, n_batch=64, attn=False, layer_dist=False, n_seq_max=2,
                      kv_unified=False) as ctx:
        assert ctx.n_streams == 2
        ctx.decode(a, 0, all_outputs=False, seq=0)
        ctx.decode(b, 0, all_outputs=False, seq=1)
        cells1, _ = ctx.cell_map(seq=1)
        assert cells1.min() >= ctx.n_size  # stream 1's cells
        both = ctx.read_keys(np.concatenate([ctx.cell_map(seq=0)[0][:3], cells1[:3]]))
        np.testing.assert_array_equal(both[:, 3:], ctx.read_keys(cells1[:3]))
        with pytest.raises(ValueError, match="out of range"):
            ctx.read_keys([ctx.n_cells])


@pytest.mark.parametrize("policy", ["keydiff", "rkv", "infokv-rkv"])
def test_key_policies_generate_inside_the_budget(model, policy: str) -> None:
    budget, buffer = 48, 16
    with Engine(model, policy, budget=budget, buffer=buffer, n_sink=4, n_recent=8, prompt_probe=False,
                n_threads=2) as engine:
        peak = 0
        for _ in engine.generate(model.tokenize(TEXT), 120, SamplingParams(temperature=0.0), ignore_eos=True):
            peak = max(peak, engine.ctx.n_used)
        assert peak <= budget + buffer and engine.totals.evicted_tokens > 0
