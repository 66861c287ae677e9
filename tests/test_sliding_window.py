"""A sliding-window model (Gemma 3 270M: 15 of 18 layers attend over the last 512 positions, 3 over everything)
under a budget: eviction happens in the full-attention layers' cache only, the sliding-window cache is left to
llama.cpp and reported beside it (docs/memory.md). The real model through the real patched llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from infokv_local import InfoKVLlama
from infokv_local.engine import Engine
from infokv_local.errors import BudgetError

from .conftest import ESSAY
from .test_server import KEY, client, kv_of, serve

CLI = [sys.executable, "-m", "infokv_local"]


@pytest.fixture(scope="module")
def text_tokens(gemma) -> list[int]:
    return gemma.tokenize(ESSAY * 12)  # ~900 tokens


def test_the_growing_part_is_the_full_attention_layers_cache(gemma):
    with Engine(gemma, "infokv", budget=96, buffer=32, n_threads=2) as eng:
        ctx = eng.ctx
        assert ctx.memory == "sliding-window" and ctx.bounded
        # Gemma 3 puts a full-attention layer after every five sliding ones
        assert ctx.attn_layers.tolist() == [5, 11, 17] and ctx.n_attn_layers == 3
        # the sliding-window cache holds the window and a batch (llama.cpp's default would size it like a full one)
        used, size = ctx.bounded_cells()
        assert used == 0 and gemma.info.n_swa + eng.max_batch <= size < 2 * (gemma.info.n_swa + eng.max_batch)
        assert eng.kv_bytes_per_cell * ctx.n_cells == ctx.growing_bytes
        assert 0 < ctx.growing_bytes and ctx.bounded_bytes > 0


@pytest.mark.parametrize("policy", ["infokv", "snapkv", "h2o", "tova", "streaming", "random"])
def test_every_policy_keeps_the_budget_at_every_step(gemma, text_tokens, policy):
    with Engine(gemma, policy, budget=96, buffer=32, n_threads=2, check_invariants=True) as eng:
        bounded_bytes = eng.ctx.bounded_bytes
        out = list(eng.generate(text_tokens[:600], max_tokens=48, ignore_eos=True))
        assert len(out) == 48
        assert eng.totals.max_used_cells <= eng.capacity and eng.totals.evicted_tokens > 0
        assert max(st.peak_cells for st in eng.totals.history) <= eng.capacity
        used, size = eng.ctx.bounded_cells()
        assert used <= size and eng.ctx.bounded_bytes == bounded_bytes
        # the statistics have one attention row per full-attention layer
        if eng.last_signals.attn_last is not None:
            assert eng.last_signals.attn_last.shape[0] == 3


def test_nothing_evicted_means_the_full_cache_answer(gemma, text_tokens):
    prompt = text_tokens[:300]
    with Engine(gemma, "full", n_threads=2, max_context=1024) as full:
        want = list(full.generate(prompt, max_tokens=24, ignore_eos=True))
    with Engine(gemma, "infokv", budget=512, buffer=64, n_threads=2, check_invariants=True) as eng:
        got = list(eng.generate(prompt, max_tokens=24, ignore_eos=True))
        assert eng.totals.evicted_tokens == 0
    assert got == want


def test_a_prompt_longer_than_the_cache_is_probed_and_read(gemma, text_tokens):
    with Engine(gemma, "infokv", budget=96, buffer=32, n_threads=2, check_invariants=True, prompt_probe=True) as eng:
        out = list(eng.generate(text_tokens[:700], max_tokens=16, ignore_eos=True))
        assert eng.probe_len > 0 and eng.probes > 0 and len(out) == 16
        _, pos = eng.ctx.cell_map()
        # the probe's tokens left both caches: the sequence goes on where the prompt and answer end
        assert pos[-1] == eng.n_past - 1 == 700 + 16 - 2  # the last sampled token is not decoded yet


def test_a_snapshot_continues_exactly(gemma, text_tokens):
    kw = dict(budget=96, buffer=32, n_threads=2)
    with Engine(gemma, "infokv", **kw) as eng:
        list(eng.generate(text_tokens[:400], max_tokens=20, ignore_eos=True))
        parked = eng.snapshot()
        want = list(eng.generate([], max_tokens=20, ignore_eos=True))
    with Engine(gemma, "infokv", **kw) as other:
        other.restore(parked)
        assert other.ctx.bounded_cells()[0] > 0  # the sliding-window cache came back too
        got = list(other.generate([], max_tokens=20, ignore_eos=True))
    assert got == want


def test_truncation_goes_back_while_the_window_is_cached(gemma, text_tokens):
    prompt = text_tokens[:200]
    with Engine(gemma, "infokv", budget=256, buffer=64, n_threads=2, check_invariants=True) as eng:
        out = list(eng.generate(prompt, max_tokens=30, ignore_eos=True))
        assert eng.totals.evicted_tokens == 0
        # back to the 19th answer token (both caches drop the later positions), then that token read again
        assert eng.truncate(len(prompt) + 19)
        again = list(eng.generate([out[19]], max_tokens=3, ignore_eos=True))
    assert again == out[20:23]


def test_truncation_past_the_sliding_window_is_refused_and_changes_nothing(gemma, text_tokens):
    with Engine(gemma, "infokv", budget=1024, buffer=128, n_batch=64, n_threads=2) as eng:
        eng.prefill(text_tokens[:900])
        assert eng.totals.evicted_tokens == 0
        size = eng.ctx.bounded_cells()[1]
        assert size < 900  # the sliding-window cache has reused the cells of positions out of its window
        cells, pos = eng.ctx.cell_map()
        assert not eng.can_truncate(100) and not eng.truncate(100)
        after_cells, after_pos = eng.ctx.cell_map()
        assert np.array_equal(cells, after_cells) and np.array_equal(pos, after_pos)
        assert eng.can_truncate(890)


def test_the_api_reports_both_parts_and_reuses_the_prompt(gemma):
    with InfoKVLlama(gemma, policy="infokv", budget=96, buffer=32, n_threads=2) as llm:
        messages = [{"role": "user", "content": ESSAY * 3 + "\nSummarise this in one sentence."}]
        first = llm.create_chat_completion(messages, max_tokens=24, temperature=0)
        kv = first["usage"]["kv"]
        assert kv["memory"] == "sliding-window" and kv["max_used_cells"] <= kv["capacity"] == 128
        assert kv["bounded_bytes"] > 0 and 0 < kv["bounded_cells"]
        assert kv["total_bytes"] == kv["kv_bytes"] + kv["bounded_bytes"]
        messages += [first["choices"][0]["message"], {"role": "user", "content": "Shorter, please."}]
        second = llm.create_chat_completion(messages, max_tokens=8, temperature=0)
        assert second["usage"]["kv"]["reused_tokens"] > 0


def test_budget_in_mib_is_refused_with_the_reason(gemma):
    with pytest.raises(BudgetError, match="sliding-window memory: budget_mib cannot be given"):
        Engine(gemma, "infokv", budget_mib=4)


def test_the_command_line_runs_a_sliding_window_model(gemma_path):
    res = subprocess.run([*CLI, "generate", "Name three colours.", "--model", str(gemma_path), "--max-tokens", "8",
                          "--budget", "64", "--buffer", "32", "--threads", "2"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() and "Traceback" not in res.stderr


def test_chat_and_batch_run_a_sliding_window_model(gemma_path, tmp_path):
    small = ["--model", str(gemma_path), "--budget", "64", "--buffer", "32", "--threads", "2"]
    res = subprocess.run([*CLI, "chat", *small, "--max-tokens", "48"], capture_output=True, text=True, timeout=600,
                         input="Tell me a story about a cat.\nWhat was the cat's name?\n/exit\n")
    assert res.returncode == 0, res.stderr
    reused = [int(ln.split("; ")[-1].split()[0]) for ln in res.stderr.splitlines() if "tokens of history reused" in ln]
    assert len(reused) == 2 and reused[0] == 0 and reused[1] > 48  # the second turn reuses the first
    assert "evicted" in res.stderr
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "The capital of France is", "max_tokens": 6}\n'
                   '{"id": "b", "messages": [{"role": "user", "content": "Write a poem about the sea."}], '
                   '"max_tokens": 120}\n')
    res = subprocess.run([*CLI, "batch", "--input", str(inp), "--output", str(out), *small], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"a", "b"} and rows["b"]["kv"]["evictions"] >= 1
    assert rows["b"]["kv"]["max_used_cells"] <= 96 and rows["b"]["kv"]["memory"] == "sliding-window"


def test_the_server_runs_a_sliding_window_model(gemma_path):
    args = ["--model", str(gemma_path), "--budget", "64", "--buffer", "32", "--threads", "2", "--slots", "2",
            "--api-key", KEY]
    with serve(*args) as base:
        c = client(base)
        story = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
        first = c.chat.completions.create(model=gemma_path.name, messages=story, max_tokens=120, temperature=0)
        kv = kv_of(first.usage)
        assert kv["memory"] == "sliding-window" and kv["evictions"] >= 1 and kv["max_used_cells"] <= 96
        assert kv["bounded_bytes"] > 0 and kv["total_bytes"] == kv["kv_bytes"] + kv["bounded_bytes"]
        turn2 = story + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "Give it a title."}]
        second = c.chat.completions.create(model=gemma_path.name, messages=turn2, max_tokens=16, temperature=0)
        assert kv_of(second.usage)["reused_tokens"] > first.usage.prompt_tokens
        chunks = list(c.chat.completions.create(model=gemma_path.name, messages=story, max_tokens=8, temperature=0,
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
