"""Flash attention chosen by timing both settings once per model, machine and size class (real model, real
llama.cpp)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from infokv_local import InfoKVLlama
from infokv_local.engine import Engine
from infokv_local.engine.sizing import DEFAULT_SIGNAL_STRIDE
from infokv_local.errors import CacheSettingsError
from infokv_local.llamacpp import flash_attn as fa
from infokv_local.llamacpp.context import StatsContext

# a small workload (the engines' is fa.engine_workload(threads, capacity))
WORK = fa.Workload(capacity=192, n_batch=64, threads=1, cache_type_k="f16", cache_type_v="f16", attn=True, window=16,
                   window_share=0.5, layer_dist=True, entropy_top_k=256)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("INFOKV_CACHE", str(tmp_path))
    return tmp_path


def test_every_setting_is_timed_once_then_the_verdict_is_cached(model, cache_dir, monkeypatch):
    choice = fa.choose(model, WORK)
    steps, prompt = choice.ms_per_token, choice.prompt_s
    assert set(steps) == set(prompt) == {"on", "off", "split"}
    # split: its own prompt timing (the fused kernel over a copy of V), the steps of off
    assert all(t > 0 for t in [*steps.values(), *prompt.values()]) and steps["split"] == steps["off"]
    total = {k: prompt[k] + fa.REPLY_TOKENS * steps[k] / 1e3 for k in steps}
    assert choice.setting == min(total, key=total.get)  # the whole request: its prompt and its reply
    assert (f"a 1024-token prompt and a 512-token reply take {total[choice.setting]:.1f} s {choice.setting} "
            f"(prompt {prompt[choice.setting]:.1f} s, {steps[choice.setting]:.2f} ms per decode step)") in choice.reason
    saved = json.loads((cache_dir / "flash-attn.json").read_text())
    assert len(saved) == 1 and next(iter(saved.values()))["ms_per_token"] == steps

    def no_timing(*_a, **_k):
        raise AssertionError("measured again")

    monkeypatch.setattr(fa, "_time", no_timing)
    assert fa.choose(model, WORK) == choice  # from the cache


def test_size_classes_are_multiples_of_256_up_to_2048():
    assert [fa.size_class(n) for n in (1, 80, 256, 257, 320, 512, 513, 1152, 1500, 2048, 2049, 32768)] == \
        [256, 256, 256, 512, 512, 512, 768, 1280, 1536, 2048, 2048, 2048]


def test_engines_of_one_size_class_share_its_verdict(model, cache_dir, monkeypatch):
    """Timed once for the class of the default budget (256 + 64 cells: 512); engines of other budgets and
    policies in the class take that verdict (so that they compute the same numbers), none is timed again."""
    verdict = fa.choose(model, fa.engine_workload(1, 320, stride=DEFAULT_SIGNAL_STRIDE))
    assert "512 cells" in verdict.reason

    def no_timing(*_a, **_k):
        raise AssertionError("measured again")

    monkeypatch.setattr(fa, "_time", no_timing)
    for policy, kw in (("infokv", dict(budget=300, buffer=64)), ("snapkv", dict(budget=400, buffer=100)),
                       ("full", dict(max_context=512)), ("streaming", dict(budget=260, buffer=16))):
        with Engine(model, policy, n_threads=1, **kw) as e:
            assert (e.flash_attn, e.flash_attn_reason) == (verdict.setting, f"{verdict.setting}: {verdict.reason}")


def test_an_engine_of_another_size_class_is_timed_at_its_size(model, cache_dir):
    with Engine(model, "infokv", budget=64, buffer=16, n_threads=1) as small:
        assert "256 cells" in small.flash_attn_reason
    with Engine(model, "full", max_context=1500, n_threads=1) as large:
        assert "1536 cells" in large.flash_attn_reason
    saved = json.loads((cache_dir / "flash-attn.json").read_text())
    assert sorted(v["fill"] for v in saved.values()) == [256, 1536]


def test_a_new_size_or_other_statistics_is_timed_on_its_own(model, cache_dir):
    fa.choose(model, WORK)
    fa.choose(model, fa.Workload(**{**WORK.__dict__, "attn": False, "layer_dist": False, "entropy_top_k": None}))
    fa.choose(model, fa.Workload(**{**WORK.__dict__, "capacity": 320}))
    assert len(json.loads((cache_dir / "flash-attn.json").read_text())) == 3


def test_the_engine_and_the_kv_block_say_which_and_why(model, cache_dir):
    with InfoKVLlama(model, budget=96, buffer=32, n_threads=1) as llm:
        kv = llm.kv_stats()
        assert kv["flash_attn"] in ("on", "off", "split")
        assert kv["flash_attn_reason"].startswith(f"{kv['flash_attn']}: measured")
        r = llm.create_completion("Once upon a time", max_tokens=8, temperature=0)
        assert r["usage"]["kv"]["flash_attn"] == kv["flash_attn"]
    with InfoKVLlama(model, budget=96, buffer=32, n_threads=1, flash_attn=False) as llm:
        assert llm.kv_stats()["flash_attn_reason"] == "off: as asked (flash_attn=False)"
    with InfoKVLlama(model, budget=96, buffer=32, n_threads=1, cache_type_v="q8_0") as llm:
        assert llm.kv_stats()["flash_attn_reason"] == "on: the quantized V cache (q8_0) needs it"


def test_an_unwritable_cache_only_costs_a_new_timing(model, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("INFOKV_CACHE", str(blocker / "sub"))
    assert fa.choose(model, WORK).setting in ("on", "off", "split")


def _timings(prompt: dict[str, float], steps: dict[str, float]):
    return lambda *_a, **_k: (prompt, steps)


def test_split_is_chosen_where_prompts_are_faster_on_and_steps_off(model, cache_dir, monkeypatch):
    """As on an Intel Xeon with AVX-512 (SmolLM2, 1,152 cells): prompts faster with it on, steps faster off."""
    scale = fa.PROMPT_TOKENS / fa._prompt_len(WORK)  # the timed prompt is shorter than the compared one
    monkeypatch.setattr(fa, "_time_both", _timings({"on": 3.5 / scale, "off": 4.0 / scale, "split": 3.6 / scale},
                                                   {"on": 27.0, "off": 16.0, "split": 16.0}))
    choice = fa.choose(model, WORK)
    assert choice.setting == "split" and choice.reason.startswith(
        "measured on this machine: a 1024-token prompt and a 512-token reply take 11.8 s split (prompt 3.6 s, 16.00 "
        "ms per decode step), 12.2 s off (prompt 4.0 s, 16.00 ms per decode step), 17.3 s on")
    with Engine(model, "infokv", budget=96, buffer=32, n_threads=1) as e:
        assert e.flash_attn == "split" and e.ctx.split_flash_attn and e.flash_attn_reason.startswith("split: measured")


def test_split_is_not_chosen_where_the_copy_costs_more(model, cache_dir, monkeypatch):
    """The fused kernel reads a copy of V: where that costs more than it saves, on or off is faster."""
    monkeypatch.setattr(fa, "_time_both", _timings({"on": 3.5, "off": 4.0, "split": 4.5},
                                                   {"on": 10.0, "off": 9.0, "split": 9.0}))
    assert fa.choose(model, WORK).setting == "on"


def test_split_is_refused_where_a_call_needs_flash_attention_on_or_off(model):
    with pytest.raises(CacheSettingsError, match="every query row"):
        Engine(model, "h2o", budget=96, buffer=32, n_threads=1, flash_attn="split")
    with pytest.raises(CacheSettingsError, match="quantized V cache"):
        Engine(model, "infokv", budget=96, buffer=32, n_threads=1, flash_attn="split", cache_type_v="q8_0")
    with pytest.raises(CacheSettingsError, match="'split'"):
        Engine(model, "infokv", budget=96, buffer=32, n_threads=1, flash_attn="fast")
    with pytest.raises(ValueError, match="auto"):
        StatsContext(model, n_ctx=128, flash_attn=None, prompt_flash_attn=True, n_threads=1, attn_all_rows=False)


def test_split_reads_prompts_with_flash_attention_and_steps_without(model):
    """Prompts run the fused kernel over a copy of the transposed V (the same logits as a context with it on),
    one-token steps the explicit softmax (close to both, equal to neither bit for bit: the prompt's cells hold
    what the fused kernel computed; the window's attention of a step at layer 0, where every run sees the same
    queries and keys, equals the one with it off)."""
    prompt = model.tokenize("The lighthouse keeper climbed the stairs every evening to light the lamp, and " * 6)
    steps = model.tokenize(" the sea was calm that night", add_special=False)
    runs = {}
    for name, kw in (("on", dict(flash_attn=True)), ("off", dict(flash_attn=False)),
                     ("split", dict(flash_attn=False, prompt_flash_attn=True))):
        with StatsContext(model, n_ctx=256, n_batch=128, n_last_rows=8, n_threads=1, attn_all_rows=False,
                          entropy_top_k=None, layer_dist=False, **kw) as ctx:
            ctx.decode(prompt, 0, all_outputs=False)
            first = ctx.logits()
            logits, attn0 = [], []
            for i, t in enumerate(steps):
                sig = ctx.decode([t], len(prompt) + i, all_outputs=False, step=True)
                logits.append(ctx.logits())
                attn0.append(sig.attn_last[0, -1])
            runs[name] = (first, np.array(logits), np.array(attn0))
    assert np.array_equal(runs["split"][0], runs["on"][0])  # the prompt: the fused kernel, as with it on
    for other in ("on", "off"):
        assert not np.array_equal(runs["split"][1], runs[other][1])
        np.testing.assert_allclose(runs["split"][1], runs[other][1], atol=0.05 * np.abs(runs[other][1]).max())
        assert (runs["split"][1].argmax(1) == runs[other][1].argmax(1)).all()
    np.testing.assert_allclose(runs["split"][2], runs["off"][2], rtol=1e-5, atol=1e-7)  # layer 0: the same K, Q
    # one token that is not a generation step (a reused prompt's last, read again) runs the prompt's kernel
    last = {}
    for name, kw in (("on", dict(flash_attn=True)), ("split", dict(flash_attn=False, prompt_flash_attn=True))):
        with StatsContext(model, n_ctx=256, n_batch=128, n_last_rows=8, n_threads=1, attn_all_rows=False,
                          entropy_top_k=None, layer_dist=False, **kw) as ctx:
            ctx.decode(prompt[:-1], 0, all_outputs=False)
            ctx.decode(prompt[-1:], len(prompt) - 1, all_outputs=False)
            last[name] = ctx.logits()
            ctx.clear()
            ctx.decode(prompt[:-1], 0, all_outputs=False)
            ctx.decode(prompt[-1:], len(prompt) - 1, all_outputs=False, step=True)
            last[name + " step"] = ctx.logits()
    assert np.array_equal(last["split"], last["on"]) and not np.array_equal(last["split step"], last["on"])


def test_a_split_engine_keeps_its_budget_through_compressions(model):
    with Engine(model, "infokv", budget=64, buffer=16, n_threads=1, flash_attn="split", check_invariants=True) as e:
        toks = list(e.generate(model.tokenize("Once upon a time"), 200, ignore_eos=True))
        assert len(toks) == 200 and e.totals.evictions >= 5 and e.totals.max_used_cells <= 80
        assert e.flash_attn == "split" and e.flash_attn_reason == "split: as asked (flash_attn='split')"

