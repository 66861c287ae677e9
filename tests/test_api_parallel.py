"""Several prompts at once through the Python API: InfoKVLlama.create_completions and InfoKVLlama(shared=...).

Real SmolLM2, real patched llama.cpp. llama.cpp is not batch-invariant, so each text is compared with the
prompt's lone run up to the first token whose two best log-probabilities (as the lone run reports them) are
within TIE of each other.
"""

from __future__ import annotations

import threading

import pytest

from infokv_local import BudgetError, InfoKVLlama

TIE = 0.5
TEXT = ("Every step of a long proof depends on the steps before it, and a reader who forgets an early lemma "
        "cannot use it later. ")
PROMPTS = [f"Note {i}. " + TEXT * (2 + i % 3) + f"Question {i}: what comes next?" for i in range(5)]
KW = dict(budget=48, buffer=16, n_threads=2, flash_attn=False, check_invariants=True)


def lone(model, prompt, n):
    """The prompt's greedy text alone and how many of its tokens come before the first near tie."""
    with InfoKVLlama(model, **KW) as llm:
        r = llm.create_completion(prompt, max_tokens=n, temperature=0, logprobs=2)
    lp = r["choices"][0]["logprobs"]
    horizon = len(lp["tokens"])
    for j, top in enumerate(lp["top_logprobs"]):
        best = sorted(top.values(), reverse=True)
        if len(best) > 1 and best[0] - best[1] < TIE:
            horizon = j
            break
    return lp["tokens"], horizon


def test_create_completions_match_lone_runs_in_order(model):
    want = [lone(model, p, 40) for p in PROMPTS]
    with InfoKVLlama(model, **KW) as llm:
        llm.create_completion("An unrelated conversation", max_tokens=4, temperature=0)
        held = llm.n_tokens
        results = llm.create_completions(PROMPTS, parallel=3, max_tokens=40, temperature=0, logprobs=2)
        assert llm.n_tokens == held  # this object's own conversation is untouched
    compared = 0
    for (toks, horizon), r in zip(want, results, strict=True):
        got = r["choices"][0]["logprobs"]["tokens"]
        assert got[:horizon] == toks[:horizon]
        compared += horizon
        kv = r["usage"]["kv"]
        assert kv["max_used_cells"] <= 48 + 16 and kv["evictions"] > 0
    assert compared >= len(PROMPTS), f"tokens compared before a near tie: {compared}"


def test_create_completions_checks_its_arguments_and_reports_errors(model):
    with InfoKVLlama(model, **KW) as llm:
        assert llm.create_completions([]) == []
        with pytest.raises(BudgetError, match="parallel must be"):
            llm.create_completions(PROMPTS, parallel=0)
        with pytest.raises(ValueError, match="does not stream"):
            llm.create_completions(PROMPTS, stream=True)
        with pytest.raises(ValueError, match="the prompt is empty"):
            llm.create_completions(["A fine prompt", ""], parallel=2, max_tokens=4)
    with InfoKVLlama(model, policy="full", n_ctx=512, n_threads=2) as full:  # one after another
        r = full.create_completions(PROMPTS[:2], max_tokens=4, temperature=0)
        assert [x["usage"]["completion_tokens"] for x in r] == [4, 4]


def test_objects_on_one_shared_context_generate_together(model):
    with InfoKVLlama(model, **KW) as llm, llm.shared_context(2) as shared:
        a = InfoKVLlama(model, shared=shared, **KW)
        b = InfoKVLlama(model, shared=shared, **KW)
        with pytest.raises(BudgetError, match="all 2 sequences"):
            InfoKVLlama(model, shared=shared, **KW)
        out = {}

        def chat(name, llm_, prompt):
            out[name] = llm_.create_completion(prompt, max_tokens=30, temperature=0)["choices"][0]["text"]

        threads = [threading.Thread(target=chat, args=("a", a, PROMPTS[0])),
                   threading.Thread(target=chat, args=("b", b, PROMPTS[1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert shared.batched_tokens > shared.batches  # steps were decoded together
        # a second turn reuses the cache as on a context of its own
        r = a.create_completion(PROMPTS[0] + out["a"] + " And then", max_tokens=5, temperature=0)
        assert r["usage"]["kv"]["reused_tokens"] > 0
        a.configure(policy="snapkv")  # gives its sequence back and takes one for the new engine
        assert a.create_completion("Hello", max_tokens=3, temperature=0)["usage"]["completion_tokens"] == 3
        with pytest.raises(BudgetError, match="does not fit a shared context"):
            a.configure(budget=4096)  # too large for the shared context: the old engine is back
        assert a.create_completion("Hello", max_tokens=3, temperature=0)["usage"]["completion_tokens"] == 3
        a.close()
        b.close()
    from infokv_local.engine import SharedContext

    with SharedContext(model, 1, 64) as own_lock, pytest.raises(ValueError, match="shared_context"):
        InfoKVLlama(model, shared=own_lock, **KW)
