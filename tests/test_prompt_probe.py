"""The prompt probe (Engine(prompt_probe=True)) on the real model: the prompt's end read ahead before each
compression of a prompt, inside the budget, leaving nothing behind, and what it buys on a needle."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import task_data
from evaluation.needle_retention import kept_after_reading, needle_span
from infokv_local.api import InfoKVLlama
from infokv_local.engine import Engine
from infokv_local.llamacpp.flash_attn import setting_of
from infokv_local.llamacpp.sampling import SamplingParams
from infokv_local.policies import ATTENTION, ATTENTION_ALL_ROWS, POLICIES, make_policy
from infokv_local.settings import DEFAULTS

EVICTING = [name for name, cls in POLICIES.items() if cls.evicts]
# the policies that score with the observation window (InfoKV, the paper's InfoKV, SnapKV, TOVA)
WINDOW_POLICIES = [p for p in EVICTING if ATTENTION in make_policy(p).needs
                   and ATTENTION_ALL_ROWS not in make_policy(p).needs]
BUDGET, BUFFER = 256, 64


@pytest.mark.parametrize("policy", EVICTING)
def test_budget_invariant_with_the_probe(model, long_tokens, policy):
    """Every policy reads a 1,500-token prompt probed: cells (the probe's included) never pass budget +
    buffer, the sinks and recent tokens stay, and the probe leaves no token behind."""
    long_tokens = long_tokens[:1500]
    with Engine(model, policy, budget=BUDGET, buffer=BUFFER, prompt_probe=True, check_invariants=True) as eng:
        eng.prefill(long_tokens)
        probes, probe_len = eng.probes, eng.probe_len
        read_used = max(s.used_cells for s in eng.totals.history)
        read_peak = max(s.peak_cells for s in eng.totals.history)
        assert eng.totals.max_used_cells <= BUDGET + BUFFER
        assert max(s.peak_cells for s in eng.totals.history) <= BUDGET + BUFFER
        pos = eng.cached_positions()
        assert eng.n_past == len(long_tokens) == len(eng.tokens)
        assert pos[:4].tolist() == [0, 1, 2, 3]
        assert pos[-32:].tolist() == list(range(len(long_tokens) - 32, len(long_tokens)))
        assert pos.max() < len(long_tokens)  # no probe token left at a position past the prompt
        assert eng.cached_token_indices().tolist() == pos.tolist()  # every cell's token is the one at its position
        out = list(eng.generate([], 20, ignore_eos=True))
        assert len(out) == 20
    if policy in WINDOW_POLICIES:
        assert {"infokv", "infokv-paper", "snapkv", "tova"} <= set(WINDOW_POLICIES)
        assert probe_len == 32 and probes > 0
        # probed compressions fill to budget + buffer - probe, the probe takes the rest for a moment
        assert read_used <= BUDGET + BUFFER - probe_len
        assert read_peak == BUDGET + BUFFER
    else:  # no observation window to probe for (h2o sums every row; streaming, random read none)
        assert probe_len == 0 and probes == 0


def test_the_probe_window_is_the_prompts_end_read_after_the_cache(model, long_tokens):
    """The first probed compression scores with exactly the attention the prompt's last 32 tokens pay the
    cached tokens when decoded right after them (checked against a cache that never evicted)."""
    tokens = long_tokens[:600]
    seen = []
    with Engine(model, "snapkv", budget=BUDGET, buffer=BUFFER, prompt_probe=True) as eng:
        flash_attn = setting_of(eng.flash_attn)
        compress = eng.compressor.compress

        def spy(target, n_incoming=1, window=None):
            if window is not None and not seen:
                cells, pos = eng.ctx.cell_map()
                seen.append((pos.copy(), window[0][:, cells].copy(), window[2]))
            return compress(target, n_incoming, window)

        eng.compressor.compress = spy
        eng.prefill(tokens)
    pos, probed, rows = seen[0]
    n_read = len(pos)
    assert pos.tolist() == list(range(n_read)) and n_read == BUDGET + BUFFER - 32 and rows == 32
    # read in the same batches as the probed engine (one of n_read tokens): with flash attention on, llama.cpp's
    # CPU kernel gives other low bits for batches of other sizes (logits ~0.4 apart on SmolLM2, as on vs off)
    # and with the probed engine's flash-attention setting (chosen per size class, so it may differ at 2,048)
    with Engine(model, "snapkv", budget=2048, buffer=BUFFER, flash_attn=flash_attn) as ref:
        ref.prefill(tokens[:n_read])
        ref.ctx.set_attention_active(True)  # the prompt fitted with room to spare: it was read without the window
        sig = ref.ctx.decode(tokens[-32:], n_read, all_outputs=False)
        cells = sig.cells[sig.cell_pos < n_read]
        expected = sig.attn_last.sum(axis=1)[:, cells]
    np.testing.assert_allclose(probed, expected, rtol=1e-3, atol=1e-5)


def test_teacher_forcing_is_never_probed(model, long_tokens):
    """feed(all_logits=True) measures predictions as the text is read: the probe stays out of it."""
    tokens = long_tokens[:800]
    logits = {}
    for probe in (False, True):
        with Engine(model, "infokv", budget=BUDGET, buffer=BUFFER, prompt_probe=probe) as eng:
            logits[probe] = np.concatenate([lg for _, lg in eng.feed(tokens, all_logits=True)])
            assert eng.probes == 0
    assert np.array_equal(logits[False], logits[True])


def test_probed_prompt_after_a_generation_and_past_compaction(model, long_tokens):
    """A second prompt arriving on a cache that generation filled makes the probe's room first; positions
    renumbered on the way (compact_at) do not disturb it."""
    with Engine(model, "infokv", budget=96, buffer=32, n_recent=16, compact_at=700, prompt_probe=True,
                check_invariants=True) as eng:
        first = list(eng.generate(long_tokens[:300], 45, SamplingParams(temperature=0.0), ignore_eos=True))
        assert len(first) == 45 and eng.probe_len == 16
        before = eng.probes
        eng.prefill(long_tokens[300:1500])
        assert eng.probes > before and eng.compactions >= 1
        assert eng.totals.max_used_cells <= 96 + 32
        pos = eng.cached_positions()
        assert pos[-16:].tolist() == list(range(eng.n_past - 16, eng.n_past))
        assert len(list(eng.generate([], 10, ignore_eos=True))) == 10


def test_the_probe_keeps_more_of_a_needle(model):
    """A 2,048-token needle prompt read at 25%: chunked, the compressions choose before the question is
    read; probed, they keep more of the needle sentence (SmolLM2, RULER-style needles, 3 seeds, SnapKV)."""

    def count(text: str) -> int:
        return len(model.tokenize(text, add_special=False, parse_special=False))

    kept = {"chunked": 0, "probe": 0}
    for seed in range(3):
        item = task_data.niah_item(2048, count, seed)
        tokens = model.tokenize(item["prompt"])
        sentence, _ = needle_span(model, item["prompt"], item["answers"][0])
        for mode in kept:
            got = kept_after_reading(model, tokens, "snapkv", len(tokens) // 4, mode, 64, None)
            kept[mode] += sum(i in got for i in sentence)
    assert kept["probe"] > kept["chunked"]


def test_the_probe_through_the_api_and_the_command_line(model):
    with InfoKVLlama(model, budget=64, buffer=32, n_recent=16) as llm:
        assert llm.kv_stats()["prompt_probe"] == 16  # on by default: min(window 32, buffer 32 // 2)
        llm.configure(prompt_probe=False)
        assert llm.kv_stats()["prompt_probe"] == 0
        llm.configure(prompt_probe=True)
        text = " ".join(f"Item {i} is stored in box {i * 7 % 13}." for i in range(60))
        res = llm.create_completion(text + " Which box holds item 5? Box", max_tokens=4, temperature=0.0)
        kv = res["usage"]["kv"]
        assert kv["prompt_probe"] == 16 and kv["probes"] > 0 and kv["max_used_cells"] <= 64 + 32
        state = llm.export_state()
        llm.configure(prompt_probe=False)
        llm.import_state(state)  # the saved settings come back with the conversation
        assert llm.kv_stats()["prompt_probe"] == 16

    import argparse

    from infokv_local.cli.options import add_model_options, add_sampling_options, settings_from_args

    ap = argparse.ArgumentParser()
    add_model_options(ap)
    add_sampling_options(ap)
    assert settings_from_args(ap.parse_args(["--prompt-probe"])).prompt_probe is True
    assert settings_from_args(ap.parse_args(["--no-prompt-probe"])).prompt_probe is False
    from infokv_local.ui.__main__ import parse_args as ui_args

    assert ui_args(["--no-prompt-probe"]).settings.prompt_probe is False
    assert ui_args([]).settings.prompt_probe is DEFAULTS.prompt_probe is True
