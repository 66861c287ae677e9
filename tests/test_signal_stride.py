"""Signals measured on every k-th prompt token (``infokv:stride=k``): the LM head on fewer rows, the rest
interpolated. Real model for the measured rows and the engine; arrays for the row choice and interpolation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from infokv_local.engine import Engine
from infokv_local.errors import PolicyError
from infokv_local.llamacpp.context import StatsContext, interpolate_rows, signal_rows
from infokv_local.policies import InfoKVPolicy, make_policy


@given(st.integers(1, 300), st.integers(0, 5000), st.integers(1, 16))
def test_signal_rows_are_aligned_on_positions(n, start, k):
    rows = signal_rows(n, start, k)
    assert rows[-1] == n - 1 and np.all(np.diff(rows) > 0)
    aligned = [r for r in range(n) if (start + r) % k == k - 1]
    assert sorted(set(aligned) | {n - 1}) == rows.tolist()


@given(st.lists(st.integers(1, 40), min_size=1, max_size=8), st.integers(1, 8))
def test_chunking_moves_no_measured_position(chunks, k):
    start, measured = 0, set()
    for n in chunks:
        measured |= {start + int(r) for r in signal_rows(n, start, k)}
        start += n
    ends = set(np.cumsum(chunks) - 1)
    assert measured == {p for p in range(start) if p % k == k - 1} | ends


def test_interpolation_between_measured_rows():
    vals = np.array([[2.0, 4.0, 8.0]])
    out = interpolate_rows(vals, np.array([1, 3, 7]), 8)
    np.testing.assert_allclose(out[0], [2, 2, 3, 4, 5, 6, 7, 8])
    # the value just before the batch anchors the first rows
    out = interpolate_rows(vals, np.array([1, 3, 7]), 8, before=0.0)
    np.testing.assert_allclose(out[0][:2], [1, 2])


def test_stride_parameter_checked():
    assert make_policy("infokv:stride=4").signal_stride == 4
    assert make_policy("infokv:stride=1").signal_stride == 1 and make_policy("snapkv").signal_stride == 1
    # the default, by the rule in BENCHMARKS.md; the paper's InfoKV measures every prompt token
    assert make_policy("infokv").signal_stride == 4 and make_policy("infokv-paper").signal_stride == 1
    for bad in ("infokv:stride=0", "infokv:stride=2.5"):
        with pytest.raises(PolicyError, match="stride must be a whole number >= 1"):
            make_policy(bad)


def test_strided_decode_measures_the_same_rows(model, tokens):
    n, k = 90, 4
    with StatsContext(model, n_ctx=512, n_batch=128) as ctx:
        ctx.decode(tokens[:10], 0)
        ref = ctx.decode(tokens[10:10 + n], 10)
        ctx.clear()
        ctx.decode(tokens[:10], 0)
        sig = ctx.decode(tokens[10:10 + n], 10, stride=k)
        rows = signal_rows(n, 10, k)
        # llama.cpp computed logits for the measured rows only
        assert ctx.logits(int(rows[0])).shape == (model.info.n_vocab,)
        with pytest.raises(ValueError, match="no logits for output"):
            ctx.logits(int(rows[0]) + 1)
        ctx.clear()
        ctx.decode(tokens[:10], 0)
        tf = ctx.decode(tokens[10:10 + n], 10, stride=k, logits_all=True)
        assert ctx.logits_rows(n).shape == (n, model.info.n_vocab)  # every row's logits, for teacher forcing
    np.testing.assert_allclose(sig.entropy_at[rows], ref.entropy_at[rows], atol=1e-4)
    np.testing.assert_allclose(sig.layer_dist[:, rows], ref.layer_dist[:, rows], atol=1e-4)
    # the same signals whether or not every row is an output
    np.testing.assert_allclose(tf.entropy_at, sig.entropy_at, atol=1e-4)
    np.testing.assert_allclose(tf.layer_dist, sig.layer_dist, atol=1e-4)
    assert np.isfinite(sig.entropy_at).all() and np.isfinite(sig.layer_dist).all()
    # in between: on the line between the measured neighbours
    a, b = int(rows[3]), int(rows[4])
    mid = (a + b) // 2
    w = (mid - a) / (b - a)
    np.testing.assert_allclose(sig.entropy_at[mid], (1 - w) * sig.entropy_at[a] + w * sig.entropy_at[b], rtol=1e-5)
    # the rows before the first measured one lie between the previous call's last token and it
    assert np.isfinite(sig.entropy_at[: rows[0]]).all()
    np.testing.assert_array_equal(sig.entropy_produced[1:], sig.entropy_at[:-1])


def test_engine_with_stride_keeps_budget_and_generates(model, long_tokens):
    budget, buffer = 256, 64
    for spec in ("infokv:stride=1", "infokv"):
        with Engine(model, spec, budget=budget, buffer=buffer, n_threads=2, check_invariants=True) as eng:
            eng.prefill(long_tokens[:1200])
            assert eng.ctx.n_used <= budget + buffer and eng.totals.evictions > 0
            out = list(eng.generate([], max_tokens=40, ignore_eos=True))
            assert len(out) == 40 and eng.ctx.n_used <= budget + buffer
            cells, pos = eng.ctx.cell_map()
            assert np.isfinite(eng.cells.ent_at[cells]).all() and np.isfinite(eng.cells.ldist[:, cells]).all()


def test_a_chunk_shorter_than_the_stride_is_interpolated(model, tokens):
    with StatsContext(model, n_ctx=256, n_batch=64) as ctx:
        ctx.decode(tokens[:8], 0, stride=4)  # positions 3 and 7 measured
        sig = ctx.decode(tokens[8:10], 8, stride=4)  # position 11 is not in it: only the last (9) is measured
    assert signal_rows(2, 8, 4).tolist() == [1]
    assert np.isfinite(sig.entropy_at).all() and np.isfinite(sig.layer_dist).all()
    assert np.isfinite(sig.entropy_produced).all()


def test_compressions_tell_the_policy_how_many_tokens_they_make_room_for(model, long_tokens):
    """Prompt chunks compress with n_incoming = the chunk, generation steps with 1 (what ``decode_mix`` reads)."""
    seen: list[int] = []

    class Spy(InfoKVPolicy):
        def score(self, inp):
            seen.append(inp.n_incoming)
            return super().score(inp)

    with Engine(model, Spy(decode_mix="rank", decode_alpha=0.5), budget=128, buffer=32, n_threads=2,
                check_invariants=True) as eng:
        eng.prefill(long_tokens[:400])
        n_prompt = len(seen)
        out = list(eng.generate([], max_tokens=80, ignore_eos=True))
    assert len(out) == 80 and n_prompt > 0 and len(seen) > n_prompt
    assert all(n > 1 for n in seen[:n_prompt]) and set(seen[n_prompt:]) == {1}


def test_one_tokens_compression_at_a_prompts_end_uses_the_prompts_mix(model, long_tokens):
    """What the observation window holds decides the mix of a one-token compression: the window of the
    first answer tokens is the prompt's end (prompt mix), after ``window`` generated tokens it is all
    generated (decode mix); a prompt read whole and compressed once is compressed with the prompt mix."""
    seen: list[tuple[int, int, float, tuple[str, float]]] = []

    class Spy(InfoKVPolicy):
        def score(self, inp):
            seen.append((len(eng.tokens), inp.n_incoming, inp.window_generated, self.mix_for(inp)))
            return super().score(inp)

    prompt = long_tokens[:316]
    # budget 128 + buffer 32, prompt chunks of 32: the prompt leaves 128 + 28 = 156 of the 160 cells used, so the
    # answer's first compression comes after 4 answer tokens (window: 4 answer, 28 prompt tokens), the next
    # after 36 (window: all answer); no prompt probe, which reads the prompt in smaller chunks
    with Engine(model, Spy(), budget=128, buffer=32, window=32, n_threads=1, check_invariants=True,
                prompt_probe=False) as eng:
        eng.prefill(prompt)
        n_prompt = len(seen)
        out = list(eng.generate([], max_tokens=110, ignore_eos=True))
        parked = eng.snapshot()
        share = eng.cells.window_generated(len(eng.tokens))
    assert len(out) == 110
    answer = [(n_tokens - len(prompt), n, generated, mix) for n_tokens, n, generated, mix in seen[n_prompt:]]
    assert [a[0] for a in answer] == [4, 36, 68, 100]
    for decoded_alone, n_incoming, generated, mix in answer:
        assert n_incoming == 1 and generated == pytest.approx(min(decoded_alone, 32) / 32)
        assert mix == (("rank", 0.5) if decoded_alone > 16 else ("paper", 0.95))
    with Engine(model, Spy(), budget=128, buffer=32, window=32, n_threads=1, prompt_probe=False) as other:
        other.restore(parked)
        assert other.cells.window_generated(len(other.tokens)) == share == 1.0

    seen.clear()
    budget = 96
    with Engine(model, Spy(), budget=budget, buffer=len(prompt) - budget, window=32, n_threads=1,
                check_invariants=True, prompt_probe=False) as eng:
        eng.prefill(prompt)
        assert seen == []
        list(eng.generate([], max_tokens=2, ignore_eos=True))  # the first answer token is decoded, not the second
        assert eng.used_cells == budget + 1
    assert seen == [(len(prompt), 1, 0.0, ("paper", 0.95))]
