"""InfoKVLlama against stock llama-cpp-python's ``Llama`` (same calls, same result shapes), llama-cpp-python's
extra arguments (``__call__``, echo, logprobs, grammar, response_format), edge inputs, and the object's
rules (no reset/configure while a stream is open; kv_stats under the model's lock; max_used_cells)."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest

from infokv_local import InfoKVLlama
from infokv_local.api import model_lock
from infokv_local.api.text_stream import token_bytes

HELLO = [{"role": "user", "content": "Say hello to Ada in one short sentence."}]


@pytest.fixture(scope="module")
def flash_attn(model) -> bool:
    """One flash-attention setting for ours and stock (the two settings' logits differ by more than the tolerances
    below): the one our engine chose for this machine, off where it chose split (prompts on, steps off), which
    llama-cpp-python cannot run."""
    with InfoKVLlama(model, budget=48, buffer=16) as ours:
        return ours.kv_stats()["flash_attn"] == "on"


@pytest.fixture
def llm(model, flash_attn):
    with InfoKVLlama(model, budget=48, buffer=16, check_invariants=True, flash_attn=flash_attn) as x:
        yield x


@pytest.fixture(scope="module")
def stock(model, model_path, flash_attn):
    """llama-cpp-python's ``Llama`` with ours' flash-attention setting."""
    from llama_cpp import Llama

    x = Llama(str(model_path), n_ctx=512, logits_all=True, verbose=False, flash_attn=flash_attn)
    yield x
    x.close()


def same_shape(stock: Any, ours: Any, where: str = "$") -> None:
    """Every key stock llama-cpp-python returns is in ours, with a value of the same type, recursively
    (a list's items compared to the first item of ours; None in stock means optional there; ours are
    JSON-serialisable Python floats where stock's logprobs are numpy float32)."""
    if stock is None:
        return
    if isinstance(stock, dict) and where.endswith("logprobs.top_logprobs[]"):  # a map token -> logprob
        assert isinstance(ours, dict) and ours, f"{where}: a token -> logprob map expected"
        assert all(isinstance(k, str) and isinstance(v, float) for k, v in ours.items()), where
    elif isinstance(stock, dict):
        assert isinstance(ours, dict), f"{where}: dict expected, got {type(ours).__name__}"
        missing = set(stock) - set(ours)
        assert not missing, f"{where}: keys missing {sorted(missing)}"
        for k in stock:
            same_shape(stock[k], ours[k], f"{where}.{k}")
    elif isinstance(stock, list):
        assert isinstance(ours, list), f"{where}: list expected, got {type(ours).__name__}"
        if stock and ours:
            for item in stock:
                same_shape(item, ours[0], f"{where}[]")
    elif isinstance(stock, (float, np.floating)):  # llama-cpp-python gives numpy float32 logprobs; ours are floats
        assert isinstance(ours, float), f"{where}: float expected, got {type(ours).__name__}"
    else:
        assert type(ours) is type(stock), f"{where}: {type(stock).__name__} expected, got {type(ours).__name__}"


def test_same_shapes_as_stock_llama_cpp_python(llm, stock):
    calls: list[tuple[str, dict[str, Any]]] = [
        ("completion", dict(max_tokens=8, temperature=0)),
        ("completion", dict(max_tokens=8, temperature=0, logprobs=3)),
        ("completion", dict(max_tokens=8, temperature=0, echo=True)),
        ("chat", dict(max_tokens=8, temperature=0)),
        ("chat", dict(max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)),
    ]
    for kind, kw in calls:
        for stream in (False, True):
            if kind == "completion":
                theirs = stock.create_completion("The capital of France is", stream=stream, **kw)
                ours = llm.create_completion("The capital of France is", stream=stream, **kw)
            else:
                theirs = stock.create_chat_completion(HELLO, stream=stream, **kw)
                ours = llm.create_chat_completion(HELLO, stream=stream, **kw)
            if not stream:
                same_shape(theirs, ours, f"{kind} {kw}")
                continue
            theirs, ours = list(theirs), list(ours)
            # the first chunk, the first chunk with text, the last chunk
            pick = lambda cs: [cs[0], next(c for c in cs if _chunk_text(c)), cs[-1]]  # noqa: E731
            for t, o in zip(pick(theirs), pick(ours), strict=True):
                same_shape(t, o, f"{kind} stream {kw}")
    # llm(...) is create_completion, as Llama.__call__
    assert llm("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"] == \
        stock("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"]


def _chunk_text(c: dict[str, Any]) -> str:
    ch = c["choices"][0]
    return ch.get("text") or ch.get("delta", {}).get("content") or ""


def test_logprobs_are_those_of_the_sampled_tokens(llm, stock):
    r = llm.create_completion("The capital of France is", max_tokens=6, temperature=0, logprobs=3)
    lp = r["choices"][0]["logprobs"]
    text = r["choices"][0]["text"]
    assert "".join(lp["tokens"]) == text and len(lp["tokens"]) == 6
    prompt_len = len("The capital of France is")
    assert lp["text_offset"][0] == prompt_len
    assert [o - prompt_len for o in lp["text_offset"]] == [len("".join(lp["tokens"][:i])) for i in range(6)]
    for tok, p, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert p <= 0 and top[tok] == p
        assert p == max(top.values())  # greedy: the sampled token is the most probable one
        assert 3 <= len(top) <= 4
    # the same numbers as llama-cpp-python's, computed from the same logits (the cache is not yet compressed)
    theirs = stock.create_completion("The capital of France is", max_tokens=6, temperature=0, logprobs=3)
    assert theirs["choices"][0]["text"] == text
    for a, b in zip(theirs["choices"][0]["logprobs"]["token_logprobs"], lp["token_logprobs"], strict=True):
        assert a == pytest.approx(b, abs=2e-3)

    chat = llm.create_chat_completion(HELLO, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat["choices"][0]["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == chat["choices"][0]["message"]["content"]
    assert all(len(c["top_logprobs"]) in (2, 3) and c["bytes"] == list(c["token"].encode()) for c in content)


def test_echo_returns_the_prompt_first(llm):
    r = llm.create_completion("Once upon a time", max_tokens=5, temperature=0)
    e = llm.create_completion("Once upon a time", max_tokens=5, temperature=0, echo=True)
    assert e["choices"][0]["text"] == "Once upon a time" + r["choices"][0]["text"]
    chunks = list(llm.create_completion("Once upon a time", max_tokens=5, temperature=0, echo=True, stream=True))
    assert chunks[0]["choices"][0]["text"] == "Once upon a time"
    lp = llm.create_completion("Once upon a time", max_tokens=3, temperature=0, echo=True, logprobs=1)
    lp = lp["choices"][0]["logprobs"]
    n_prompt = len(llm.tokenize(b"Once upon a time"))
    assert lp["token_logprobs"][:n_prompt] == [None] * n_prompt and None not in lp["token_logprobs"][n_prompt:]


def test_json_response_format_and_grammar(llm):
    r = llm.create_chat_completion([{"role": "user", "content": "Describe a cat as JSON."}], max_tokens=60,
                                   temperature=0, response_format={"type": "json_object"})
    text = r["choices"][0]["message"]["content"]
    assert text.lstrip().startswith("{")  # the model alone starts with ``` here
    if r["choices"][0]["finish_reason"] == "stop":
        json.loads(text)
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    r = llm.create_chat_completion([{"role": "user", "content": "What is 2 + 3?"}], max_tokens=30, temperature=0,
                                   response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    assert r["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(r["choices"][0]["message"]["content"])["answer"], int)
    r = llm.create_completion("Is the sky blue? Answer:", max_tokens=5, temperature=0.9, seed=3,
                              grammar='root ::= " yes" | " no"')
    assert r["choices"][0]["text"] in (" yes", " no") and r["choices"][0]["finish_reason"] == "stop"
    with pytest.raises(ValueError, match="grammar does not parse"):
        llm.create_completion("x", max_tokens=2, grammar="root ::= (")
    with pytest.raises(ValueError, match="unsupported response_format"):
        llm.create_chat_completion(HELLO, max_tokens=2, response_format={"type": "yaml"})
    # the object is usable after the refusals
    assert llm.create_completion("The sky is", max_tokens=3, temperature=0)["usage"]["completion_tokens"] == 3


def test_reset_and_configure_refused_while_a_stream_is_open(llm):
    stream = llm.create_completion("Once upon a time", max_tokens=30, temperature=0, stream=True)
    next(stream)
    with pytest.raises(RuntimeError, match="still open"):
        llm.reset()
    with pytest.raises(RuntimeError, match="still open"):
        llm.configure(budget=40)
    rest = list(stream)
    assert rest[-1]["choices"][0]["finish_reason"] == "length" and llm.kv_stats()["budget"] == 48
    llm.configure(budget=40)
    llm.reset()
    assert llm.kv_stats()["sequence_tokens"] == 0 and llm.kv_stats()["budget"] == 40


def test_kv_stats_waits_for_the_model_lock(llm):
    got: list[dict[str, Any]] = []
    lock = model_lock(llm.model)
    with lock:
        reader = threading.Thread(target=lambda: got.append(llm.kv_stats()))
        reader.start()
        reader.join(2.0)
        assert reader.is_alive() and not got  # blocked while another holder works on the model
    reader.join()
    assert got and got[0]["policy"] == "infokv-rkv"  # the default


def test_max_used_cells_is_since_the_conversation_began(model):
    with InfoKVLlama(model, policy="full", n_ctx=512) as llm:
        prompt = "The history of the lighthouse begins"
        first = llm.create_completion(prompt, max_tokens=40, temperature=0)
        peak = first["usage"]["kv"]["max_used_cells"]
        assert peak == first["usage"]["kv"]["request_max_used_cells"] == first["usage"]["total_tokens"] - 1
        # an edited continuation: the cache is truncated to the prompt + 3 tokens, then grows by a few
        pieces = [token_bytes(model, t).decode() for t in model.tokenize(first["choices"][0]["text"],
                                                                          add_special=False)]
        second = llm.create_completion(prompt + "".join(pieces[:3]) + " and", max_tokens=2, temperature=0)
        kv = second["usage"]["kv"]
        assert kv["reused_tokens"] > 0
        assert kv["max_used_cells"] == peak == llm.kv_stats()["max_used_cells"]
        assert kv["request_max_used_cells"] < peak - 20
        llm.reset()
        assert llm.kv_stats()["max_used_cells"] == 0


def test_max_tokens_zero_or_negative_means_until_the_end(llm):
    for n in (0, -1, None):
        r = llm.create_chat_completion([{"role": "user", "content": "Reply with the single word: yes"}],
                                       max_tokens=n, temperature=0)
        assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] > 0


def test_bad_text_inputs_are_clear_errors(llm):
    with pytest.raises(ValueError, match="the prompt is empty"):
        llm.create_completion("", max_tokens=2)
    # undecodable bytes in a prompt are read as the tokenizer reads bytes (given as bytes or surrogate-escaped)
    n_bytes = llm.create_completion(b"ab\xffcd", max_tokens=2)["usage"]["prompt_tokens"]
    assert n_bytes == llm.create_completion("ab\udcffcd", max_tokens=2)["usage"]["prompt_tokens"]
    assert n_bytes == len(llm.tokenize(b"ab\xffcd".decode("utf-8", "surrogateescape")))
    with pytest.raises(ValueError, match="lone surrogate U\\+D800 at character 2"):
        llm.create_completion("ab\ud800cd", max_tokens=2)
    with pytest.raises(ValueError, match="the stop sequence is not valid UTF-8"):
        llm.create_completion("Hello", max_tokens=2, stop=b"\xe2\x82")
    with pytest.raises(ValueError, match="stop sequence 2 is not valid UTF-8 text"):
        llm.create_chat_completion(HELLO, max_tokens=2, stop=["ok", "\ud800"])
    with pytest.raises(ValueError, match="logprobs must be an integer"):
        llm.create_completion("Hello", max_tokens=2, logprobs=-1)
    # nothing was lost: the object still answers, and bytes prompts and stops work
    r = llm.create_completion(b"The capital of France is", max_tokens=6, temperature=0, stop=[b" Paris"])
    assert r["choices"][0]["text"] == "" and r["choices"][0]["finish_reason"] == "stop"


def test_stops_that_begin_inside_a_multibyte_token_piece(llm, model):
    prompt = "Emoji list: 🍎 apple, 🍌 banana, 🍒 cherry, 🍇 grapes, 🍉"
    # the tokenizer splits these emoji over several tokens, so the stops below begin inside token pieces
    pieces = [token_bytes(model, t) for t in model.tokenize(prompt, add_special=False)]
    assert any(p.startswith(b" \xf0") and len(p) < 5 for p in pieces)
    whole = llm.create_completion(prompt, max_tokens=12, temperature=0)["choices"][0]["text"]
    emoji = [i for i, ch in enumerate(whole) if ord(ch) > 0xFFFF]
    assert len(emoji) >= 2, whole
    for i in emoji[:3]:
        stop = whole[i : i + 2]
        for stream in (False, True):
            r = llm.create_completion(prompt, max_tokens=12, temperature=0, stop=[stop], stream=stream)
            if stream:
                chunks = list(r)
                text, finish = "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]
            else:
                text, finish = r["choices"][0]["text"], r["choices"][0]
            assert text == whole[: whole.find(stop)] and finish["finish_reason"] == "stop", (stop, text)


def test_logit_bias_as_stock_llama_cpp_python(llm, stock, model):
    """A banned token is never generated, a favoured one is, and the greedy text is stock's with the same
    ``logit_bias``; OpenAI's string keys work; ids outside the vocabulary and NaN are clear errors."""
    prompt = "The capital of France is"
    plain = llm.create_completion(prompt, max_tokens=6, temperature=0, logprobs=1)
    first = model.tokenize(plain["choices"][0]["logprobs"]["tokens"][0], add_special=False, parse_special=False)[0]
    for bias in ({first: float("-inf")}, {first: -100.0}, {str(first): -100.0}):
        ours = llm.create_completion(prompt, max_tokens=6, temperature=0, logit_bias=bias)["choices"][0]["text"]
        assert ours != plain["choices"][0]["text"]
        theirs = stock.create_completion(prompt, max_tokens=6, temperature=0,
                                         logit_bias={int(k): v for k, v in bias.items()})["choices"][0]["text"]
        assert ours == theirs
    favoured = model.tokenize(" banana", add_special=False, parse_special=False)[0]
    out = llm.create_chat_completion(HELLO, max_tokens=3, temperature=0, logit_bias={favoured: 100.0})
    assert out["choices"][0]["message"]["content"] == " banana" * 3
    for bad, why in (({model.info.n_vocab: -1.0}, "outside the vocabulary"), ({"x": 1.0}, "token ids"),
                     ({first: float("nan")}, "must be a number")):
        with pytest.raises(ValueError, match=why):
            llm.create_completion(prompt, max_tokens=2, logit_bias=bad)
    again = llm.create_completion(prompt, max_tokens=6, temperature=0)
    assert again["choices"][0]["text"] == plain["choices"][0]["text"]


def test_ignore_eos_generates_max_tokens(model, model_path):
    """``--ignore-eos`` bans every end-of-generation token (as llama.cpp's option of that name)."""
    import subprocess
    import sys

    eog = model.eog_tokens()
    assert model.eos_token_id in eog and all(model.is_eog(t) for t in eog)
    r = subprocess.run([sys.executable, "-m", "infokv_local", "generate", "Say hi.", "--model", str(model_path),
                        "--max-tokens", "120", "--budget", "64", "--buffer", "16", "--ignore-eos", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["usage"]["completion_tokens"] == 120 and res["finish_reason"] == "length"
