"""A prompt read once and forked to other policies: InfoKVLlama.prefill, export_state and fork_state.

Real SmolLM2, real patched llama.cpp. A fork must leave exactly what the policy's own reading of the prompt would
have left: the same cells, positions, signals and logits, so that the same greedy text follows. Every generation
here runs alone (one sequence decoding at a time), where llama.cpp is deterministic, so texts are compared whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evaluation import evidence_cli
from infokv_local import ForkRefused, InfoKVLlama
from infokv_local.engine.cells import FILLS

KW = dict(budget=64, buffer=32, n_threads=2, flash_attn=False, check_invariants=True)
MESSAGES = [{"role": "user", "content": "A farmer has 17 sheep and buys 3 times as many goats as sheep. He then "
                                        "sells 9 goats. How many animals does he have now? Think step by step."}]
LONG = [{"role": "user", "content": MESSAGES[0]["content"] + " Explain every step in detail. " * 20}]
GROUPS = [("snapkv", ["rkv", "tova"]), ("infokv", ["infokv-rkv"]),
          ("streaming", ["keydiff", "random", "context-shift"])]


def same_state(a: InfoKVLlama, b: InfoKVLlama) -> None:
    ea, eb = a.engine, b.engine
    assert ea.tokens == eb.tokens and ea.n_past == eb.n_past
    ca, pa = ea.ctx.cell_map()
    cb, pb = eb.ctx.cell_map()
    assert np.array_equal(pa, pb)
    oa, ob = np.argsort(pa), np.argsort(pb)
    for name in FILLS:
        xa, xb = getattr(ea.cells, name)[..., ca[oa]], getattr(eb.cells, name)[..., cb[ob]]
        assert np.array_equal(xa, xb, equal_nan=xa.dtype.kind == "f"), name
    assert (ea.cells.ring_next, ea.cells.ring_len) == (eb.cells.ring_next, eb.cells.ring_len)


@pytest.mark.parametrize(("reader", "others"), GROUPS, ids=[g[0] for g in GROUPS])
def test_a_forked_prompt_holds_what_reading_it_would_on_a_shared_context(model, reader, others):
    policies = [reader, *others]
    with InfoKVLlama(model, policy=reader, **KW) as base, base.shared_context(2 * len(policies), policies) as shared:
        make = lambda p: InfoKVLlama(model, shared=shared, **(base.clone_settings() | {"policy": p}))  # noqa: E731
        forked = {p: make(p) for p in policies}
        read = {p: make(p) for p in policies}
        try:
            n = forked[reader].prefill(MESSAGES)
            assert 0 < n <= KW["budget"] + KW["buffer"] and forked[reader].engine.totals.evicted_tokens == 0
            state = forked[reader].export_state()
            for p in others:
                forked[p].fork_state(state)
            for p in policies:
                assert read[p].prefill(MESSAGES) == n
                same_state(forked[p], read[p])
            for p in policies:  # one generation at a time: each step decoded alone
                a = forked[p].create_chat_completion(MESSAGES, max_tokens=80, temperature=0, seed=0)
                b = read[p].create_chat_completion(MESSAGES, max_tokens=80, temperature=0, seed=0)
                assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"], p
                assert a["usage"]["kv"]["evicted_tokens"] == b["usage"]["kv"]["evicted_tokens"] > 0
                assert a["timings"]["prompt_n"] == b["timings"]["prompt_n"] == 0  # read before: nothing to read
                assert a["usage"]["kv"]["max_used_cells"] <= KW["budget"] + KW["buffer"]
        finally:
            for llm in [*forked.values(), *read.values()]:
                llm.close()


def test_prefill_then_the_same_request_reads_nothing_and_replies_as_without_it(model):
    with InfoKVLlama(model, policy="snapkv", **KW) as a, InfoKVLlama(model, policy="snapkv", **KW) as b:
        plain = a.create_chat_completion(MESSAGES, max_tokens=60, temperature=0, seed=0)
        assert b.prefill(MESSAGES) == plain["usage"]["prompt_tokens"]
        assert b.prefill(MESSAGES) == 0  # held already
        after = b.create_chat_completion(MESSAGES, max_tokens=60, temperature=0, seed=0)
    assert after["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert after["timings"]["prompt_n"] == 0 and after["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


def test_a_fork_between_objects_of_their_own(model):
    """No shared context: the saved prompt moves to another object's own context."""
    with InfoKVLlama(model, policy="tova", **KW) as reader, InfoKVLlama(model, policy="rkv", **KW) as forked, \
            InfoKVLlama(model, policy="rkv", **KW) as own:
        reader.prefill(MESSAGES)
        forked.fork_state(reader.export_state())
        a = forked.create_chat_completion(MESSAGES, max_tokens=60, temperature=0, seed=0)
        b = own.create_chat_completion(MESSAGES, max_tokens=60, temperature=0, seed=0)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["usage"]["kv"]["evicted_tokens"] == b["usage"]["kv"]["evicted_tokens"] > 0


def test_a_fork_is_refused_where_the_reading_would_differ_and_changes_nothing(model):
    with InfoKVLlama(model, policy="snapkv", **KW) as reader, \
            InfoKVLlama(model, policy="infokv", **KW) as other_signals, \
            InfoKVLlama(model, policy="rkv", **(KW | {"budget": 72})) as other_budget, \
            InfoKVLlama(model, policy="rkv", **KW) as follower:
        follower.create_completion("An unrelated conversation", max_tokens=4, temperature=0)
        held = follower.n_tokens
        reader.prefill(MESSAGES)
        state = reader.export_state()
        with pytest.raises(ForkRefused, match="read the prompt instead"):
            other_signals.fork_state(state)  # InfoKV records entropy and layer evolution, SnapKV does not
        with pytest.raises(ForkRefused, match="read the prompt instead"):
            other_budget.fork_state(state)
        reader.prefill(LONG)  # longer than budget + buffer: compressed while it was read
        assert reader.engine.totals.evicted_tokens > 0
        with pytest.raises(ForkRefused, match="already compressed"):
            follower.fork_state(reader.export_state())
        assert follower.n_tokens == held
        assert follower.reusable_tokens("An unrelated conversation and more") > 0  # its conversation goes on


def test_tasks_read_a_prompt_once_for_the_policies_that_read_it_alike(tmp_path: Path, model_path: Path) -> None:
    argv = ["tasks", "--task", "decode-pressure", "--model", str(model_path), "--limit", "1", "--max-tokens", "32",
            "--budget", "100", "--buffer", "32", "--policies", "snapkv,rkv,tova,streaming", "--parallel", "4",
            "--no-progress", "--flash-attn", "off"]
    out = {how: tmp_path / f"{how}.json" for how in ("fork", "read")}
    assert evidence_cli.main([*argv, "--out", str(out["fork"])]) == 0
    assert evidence_cli.main([*argv, "--out", str(out["read"]), "--no-fork"]) == 0
    recs = {how: {r["policy"]: r for r in map(json.loads, path.with_suffix(".jsonl").read_text().splitlines())}
            for how, path in out.items()}
    forked = recs["fork"]
    assert forked["snapkv"]["prompt_tokens"] <= 100 + 32  # the prompt fits: no compression while it is read
    assert sum(r["prompt_forked"] for r in forked.values()) == 2  # one of snapkv, rkv, tova reads; streaming alone
    assert not forked["streaming"]["prompt_forked"]
    assert all("prompt_forked" not in r for r in recs["read"].values())
    for p, r in forked.items():
        assert r["text"] == recs["read"][p]["text"] and r["evicted_tokens"] == recs["read"][p]["evicted_tokens"] > 0
