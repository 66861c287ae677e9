"""A request stopped from another thread (``cancel=``) and a bound on the prompt tokens it may read
(``max_prompt_tokens=``): nothing is lost, nothing half-recorded. Real model, real patched llama.cpp."""

from __future__ import annotations

import threading
import time

import pytest

from infokv_local import InfoKVLlama, PromptTooLongError, RequestCancelled
from infokv_local.llamacpp.model import TOKENIZE_PIECE_BYTES

from .conftest import ESSAY, haystack_essay
from .test_interrupt import assert_consistent


def _when(condition, then, timeout: float = 120.0) -> threading.Thread:
    """A thread that calls ``then()`` once ``condition()`` holds (polled)."""
    def run() -> None:
        end = time.monotonic() + timeout
        while not condition() and time.monotonic() < end:
            time.sleep(0.001)
        then()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("text", [
    ESSAY * 3,
    "a" * 3000,  # one long word
    "  \n\t " * 400 + "x",  # whitespace runs
    "naïve café, 東京, Ελληνικά, 🙂🙂 " * 200,
    haystack_essay("siliconvalley.txt") * 3,  # over TOKENIZE_PIECE_BYTES: counted in pieces first
    "b" * (TOKENIZE_PIECE_BYTES + 5000),  # a word longer than a piece: cut inside it
])
def test_the_bounded_tokenizer_is_exact_at_its_limit(model, text):
    tokens = model.tokenize(text)
    assert model.tokenize_bounded(text, len(tokens)) == tokens
    with pytest.raises(PromptTooLongError, match=f"over the limit of {len(tokens) - 1} tokens"):
        model.tokenize_bounded(text, len(tokens) - 1)


def test_a_huge_prompt_is_refused_without_being_tokenized_whole(model):
    per_token = model.max_token_bytes()
    assert per_token is not None and per_token >= len(model.token_bytes(model.eos_token_id, True))
    huge = "a" * 3_000_000
    with pytest.raises(PromptTooLongError, match="bytes are at least"):  # the byte bound alone
        model.tokenize_bounded(huge, 1000)
    # within the byte bound but over the limit: found in the first pieces
    text = "a" * (1000 * per_token)
    with pytest.raises(PromptTooLongError, match=r"more than 1000 tokens in its first \d+ of"):
        model.tokenize_bounded(text, 1000)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(RequestCancelled, match="cancelled while the prompt was tokenized"):
        model.tokenize_bounded(text, 10**6, cancel=cancel)


def test_max_prompt_tokens_counts_what_must_be_read_and_changes_nothing_when_refused(model):
    with InfoKVLlama(model, budget=64, buffer=16, n_recent=8, n_threads=1, check_invariants=True) as llm:
        story = [{"role": "user", "content": "Tell me a story about a fox."}]
        first = llm.create_chat_completion(story, max_tokens=40, temperature=0)
        n_history = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
        before = (list(llm.engine.tokens), llm.kv_stats()["used_cells"])
        long_turn = story + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                             {"role": "user", "content": ESSAY * 4}]
        with pytest.raises(PromptTooLongError, match="the part of the prompt not cached is over the limit of 50"):
            llm.create_chat_completion(long_turn, max_tokens=4, max_prompt_tokens=50)
        assert (list(llm.engine.tokens), llm.kv_stats()["used_cells"]) == before  # nothing changed
        # a history longer than the limit is no obstacle: only the new turn is read
        short_turn = long_turn[:2] + [{"role": "user", "content": "And then?"}]
        r = llm.create_chat_completion(short_turn, max_tokens=4, max_prompt_tokens=20, temperature=0)
        assert r["usage"]["kv"]["reused_tokens"] >= n_history - 1 > 20
        for bad in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match="max_prompt_tokens must be a positive whole number"):
                llm.create_completion("Hi", max_tokens=1, max_prompt_tokens=bad)
        with pytest.raises(PromptTooLongError, match="the prompt is over the limit of 3 tokens"):
            llm.create_completion("a b c d e f g", max_tokens=1, max_prompt_tokens=3)
        assert llm.create_completion("Hi there", max_tokens=1)["usage"]["prompt_tokens"] > 0
        assert_consistent(llm.engine)


def test_cancel_while_the_prompt_is_read_keeps_what_was_read(model, long_tokens):
    """Cancelled after the first chunks of a prompt longer than the cache: RequestCancelled, the cache holds
    the chunks read (compressed, in budget), and the same call again reads only the rest."""
    with InfoKVLlama(model, budget=128, buffer=32, n_recent=8, n_threads=1, check_invariants=True) as llm:
        prompt = llm.detokenize(long_tokens[1:1200]).decode("utf-8", "ignore")
        n_prompt = len(llm.tokenize(prompt))
        cancel = threading.Event()
        _when(lambda: llm.engine.totals.tokens >= 300, cancel.set)
        with pytest.raises(RequestCancelled, match="while the prompt was read"):
            llm.create_completion(prompt, max_tokens=8, temperature=0, cancel=cancel)
        read = len(llm.engine.tokens)
        assert 300 <= read < n_prompt and llm.engine.totals.evicted_tokens > 0
        assert llm.kv_stats()["max_used_cells"] <= 128 + 32
        assert_consistent(llm.engine)
        again = llm.create_completion(prompt, max_tokens=8, temperature=0)
        assert again["usage"]["kv"]["reused_tokens"] == read
        assert again["usage"]["prompt_tokens"] == n_prompt and again["usage"]["completion_tokens"] == 8
        assert_consistent(llm.engine)


def test_cancel_while_generating_keeps_the_reply_so_far(model):
    with InfoKVLlama(model, budget=64, buffer=16, n_recent=8, n_threads=1, check_invariants=True) as llm:
        cancel = threading.Event()
        no_end = {t: float("-inf") for t in model.eog_tokens()}
        stream = llm.create_completion("Write a long story about a dragon.", max_tokens=300, temperature=0,
                                       stream=True, cancel=cancel, logit_bias=no_end)
        text = []
        with pytest.raises(RequestCancelled, match="while the reply was generated"):
            for i, chunk in enumerate(stream):
                text.append(chunk["choices"][0]["text"])
                if i == 40:
                    cancel.set()
        assert_consistent(llm.engine)
        n_cached = len(llm.engine.tokens)
        go_on = llm.create_completion("Write a long story about a dragon." + "".join(text), max_tokens=4)
        # everything but what the reply's text does not show yet (a token sampled, not released) is reused
        assert go_on["usage"]["kv"]["reused_tokens"] >= n_cached - 2
        assert_consistent(llm.engine)
