"""Flash attention chosen by timing both settings once per model, machine and size class (real model, real
llama.cpp)."""

from __future__ import annotations

import json

import pytest

from infokv_local import InfoKVLlama
from infokv_local.engine import Engine
from infokv_local.engine.sizing import DEFAULT_SIGNAL_STRIDE
from infokv_local.llamacpp import flash_attn as fa

# a small workload (the engines' is fa.engine_workload(threads, capacity))
WORK = fa.Workload(capacity=192, n_batch=64, threads=1, cache_type_k="f16", cache_type_v="f16", attn=True, window=16,
                   window_share=0.5, layer_dist=True, entropy_top_k=256)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("INFOKV_CACHE", str(tmp_path))
    return tmp_path


def test_both_settings_are_timed_once_then_the_verdict_is_cached(model, cache_dir, monkeypatch):
    choice = fa.choose(model, WORK)
    steps, prompt = choice.ms_per_token, choice.prompt_s
    assert set(steps) == set(prompt) == {"on", "off"} and all(t > 0 for t in [*steps.values(), *prompt.values()])
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
        assert kv["flash_attn"] in ("on", "off") and kv["flash_attn_reason"].startswith(f"{kv['flash_attn']}: measured")
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
    assert fa.choose(model, WORK).setting in ("on", "off")
