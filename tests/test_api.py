"""InfoKVLlama on the real model: llama-cpp-python's result shapes, streaming, stops, multi-turn reuse."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from infokv_local import BudgetError, InfoKVLlama
from infokv_local.api.text_stream import StopMatcher, Utf8Pieces
from infokv_local.errors import ContextFullError
from infokv_local.settings import DEFAULTS

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


@pytest.fixture
def llm(model):
    with InfoKVLlama(model, budget=48, buffer=16, check_invariants=True) as x:
        yield x


def chat_text(chunks) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_completion_has_llama_cpp_python_shape(llm, model_path):
    r = llm.create_completion("The capital of France is", max_tokens=12, temperature=0)
    assert set(r) >= {"id", "object", "created", "model", "choices", "usage"}
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and r["model"] == str(model_path)
    (choice,) = r["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert choice["finish_reason"] == "length" and "Paris" in choice["text"]
    u = r["usage"]
    assert u["completion_tokens"] == 12 and u["total_tokens"] == u["prompt_tokens"] + 12
    assert u["prompt_tokens"] == len(llm.tokenize(b"The capital of France is"))
    kv = u["kv"]
    assert {"budget", "used_cells", "kv_bytes", "evictions"} <= set(kv)
    assert kv["budget"] == 48 and kv["buffer"] == 16 and kv["policy"] == DEFAULTS.policy == "infokv-rkv"
    assert kv["kv_bytes"] == kv["used_cells"] * kv["kv_bytes_per_token"]


def test_stream_chunks_join_to_the_whole_completion(llm):
    whole = llm.create_chat_completion(STORY, max_tokens=100, temperature=0.8, seed=7)
    chunks = list(llm.create_chat_completion(STORY, max_tokens=100, temperature=0.8, seed=7, stream=True))
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" and "kv" in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"
    assert chat_text(chunks) == whole["choices"][0]["message"]["content"] and len(chat_text(chunks)) > 100
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"] == 100
    # the cache was compressed while streaming, never above budget + buffer
    used = [c["kv"]["used_cells"] for c in chunks]
    assert max(used) <= 64 and chunks[-1]["kv"]["evictions"] >= 2 and chunks[-1]["kv"]["max_used_cells"] == 64

    plain = list(llm.create_completion("Once upon a time", max_tokens=40, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in plain) == \
        llm.create_completion("Once upon a time", max_tokens=40, temperature=0)["choices"][0]["text"]


def test_stop_sequences_cut_the_text(llm):
    free = llm.create_completion("Once upon a time", max_tokens=60, temperature=0)["choices"][0]["text"]
    word = free.split()[8]
    cut = llm.create_completion("Once upon a time", max_tokens=60, temperature=0, stop=["zzz", word])
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == free[: free.index(word)]
    streamed = list(llm.create_completion("Once upon a time", max_tokens=60, temperature=0, stop=word, stream=True))
    assert "".join(c["choices"][0]["text"] for c in streamed) == free[: free.index(word)]


def test_multi_turn_chat_keeps_the_compressed_cache(llm):
    messages = list(STORY)
    first = llm.create_chat_completion(messages, max_tokens=80, temperature=0)
    kv1 = first["usage"]["kv"]
    assert kv1["evicted_tokens"] > 0  # the first turn already overflowed the 48-token budget
    for question in ("What was the keeper's name?", "How did the story end?"):
        messages += [first["choices"][0]["message"], {"role": "user", "content": question}]
        seq_before = llm.kv_stats()["sequence_tokens"]
        nxt = llm.create_chat_completion(messages, max_tokens=40, temperature=0)
        kv = nxt["usage"]["kv"]
        assert kv["reused_tokens"] == seq_before  # the history was not prefilled again
        new_turn = len(llm.tokenize(("<|im_end|>\n<|im_start|>user\n" + question +
                                     "<|im_end|>\n<|im_start|>assistant\n").encode(), add_bos=False, special=True))
        assert nxt["timings"]["prompt_n"] == new_turn
        assert nxt["usage"]["prompt_tokens"] == seq_before + new_turn
        assert nxt["choices"][0]["message"]["content"].strip()
        assert kv["max_used_cells"] <= 64 and kv["evicted_tokens"] > kv1["evicted_tokens"]
        first, kv1 = nxt, kv


def test_regenerated_first_answer_reads_only_the_prompts_last_token_again(llm, model):
    """The same first prompt again (a regenerated answer) keeps the cache of all of it but its last token, which
    is fed again for its logits, also when the prompt was compressed while it was read."""
    document = " ".join(["The keeper lit the lamp at dusk and watched the grey sea for ships."] * 12)
    messages = [{"role": "user", "content": "Summarise this in one line: " + document}]
    first = llm.create_chat_completion(messages, max_tokens=6, temperature=0)
    n = first["usage"]["prompt_tokens"]
    assert n > 64 and first["usage"]["kv"]["evicted_tokens"] > 0  # read in compressed chunks
    again = llm.create_chat_completion(messages, max_tokens=6, temperature=0)
    assert again["usage"]["kv"]["reused_tokens"] == n - 1 and again["timings"]["prompt_n"] == 1
    assert again["usage"]["prompt_tokens"] == n and llm.kv_stats()["max_used_cells"] <= 64
    with InfoKVLlama(model, policy="full") as full:
        a = full.create_chat_completion(messages, max_tokens=12, temperature=0)
        b = full.create_chat_completion(messages, max_tokens=12, temperature=0)
        assert b["usage"]["kv"]["reused_tokens"] == a["usage"]["prompt_tokens"] - 1
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]


def test_reuse_gives_what_a_fresh_prefill_gives(model):
    """With the full cache, continuing a chat from the cache reads the same tokens as a fresh run on the whole
    history and predicts the same next-token distribution (up to the float differences of batch shapes)."""
    with InfoKVLlama(model, policy="full") as a, InfoKVLlama(model, policy="full") as b:
        messages = list(STORY)
        reply = a.create_chat_completion(messages, max_tokens=30, temperature=0)["choices"][0]["message"]
        messages += [reply, {"role": "user", "content": "Give the keeper a name."}]
        reused = a.create_chat_completion(messages, max_tokens=1, temperature=0)
        fresh = b.create_chat_completion(messages, max_tokens=1, temperature=0)
        assert reused["usage"]["kv"]["reused_tokens"] > 30 and fresh["usage"]["kv"]["reused_tokens"] == 0
        n = fresh["usage"]["prompt_tokens"]
        assert reused["usage"]["prompt_tokens"] == n and a.engine.tokens[:n] == b.engine.tokens[:n]
        pa, pb = (softmax(x.engine.ctx.logits_rows(1)[-1].astype(np.float64)) for x in (a, b))
        assert pa.argmax() == pb.argmax() and float(np.sum(pa * np.log(pa / pb))) < 0.02


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_stop_string_then_next_turn_reuses_the_cache(llm):
    free = llm.create_chat_completion(STORY, max_tokens=40, temperature=0)["choices"][0]["message"]["content"]
    word = free.split()[10]
    llm.reset()
    cut = llm.create_chat_completion(STORY, max_tokens=40, temperature=0, stop=word)
    assert cut["choices"][0]["finish_reason"] == "stop"
    seq = llm.kv_stats()["sequence_tokens"]
    before = list(llm.engine.tokens)
    messages = STORY + [cut["choices"][0]["message"], {"role": "user", "content": "Go on."}]
    nxt = llm.create_chat_completion(messages, max_tokens=10, temperature=0)
    new_prompt = llm.engine.tokens[: nxt["usage"]["prompt_tokens"]]
    common = common_prefix(before, new_prompt)
    # the token that completed the stop string was never decoded; the stop word's earlier tokens (" Monica" of
    # "Monica,") were, and are all the next turn reads again: everything before the stop word is reused
    n_word = len(llm.tokenize(" " + word, add_bos=False))
    assert nxt["usage"]["kv"]["reused_tokens"] == common and seq - n_word < common <= seq


def test_edited_reply_drops_only_the_changed_tail(llm):
    first = llm.create_chat_completion(STORY, max_tokens=30, temperature=0)
    prompt_tokens, seq = first["usage"]["prompt_tokens"], llm.kv_stats()["sequence_tokens"]
    before = list(llm.engine.tokens)
    edited = first["choices"][0]["message"]["content"].rsplit(" ", 3)[0] + " and then"
    messages = STORY + [{"role": "assistant", "content": edited}, {"role": "user", "content": "Go on."}]
    nxt = llm.create_chat_completion(messages, max_tokens=10, temperature=0)
    new_prompt = llm.engine.tokens[: nxt["usage"]["prompt_tokens"]]
    common = common_prefix(before, new_prompt)
    # the reply's last words were cut (the sequence holds all but the reply's last sampled token): exactly the
    # tokens before the first changed one are reused, the prompt and the unchanged start of the reply
    assert nxt["usage"]["kv"]["reused_tokens"] == common and prompt_tokens < common < seq
    assert llm.kv_stats()["max_used_cells"] <= 64


def test_cancelled_stream_leaves_a_usable_cache(llm):
    stream = llm.create_chat_completion(STORY, max_tokens=200, temperature=0, stream=True)
    got = [next(stream) for _ in range(30)]
    with pytest.raises(RuntimeError, match="still open"):
        llm.create_completion("hi", max_tokens=2)
    stream.close()
    partial = chat_text(got)
    seq = llm.kv_stats()["sequence_tokens"]
    messages = STORY + [{"role": "assistant", "content": partial}, {"role": "user", "content": "Shorter, please."}]
    nxt = llm.create_chat_completion(messages, max_tokens=20, temperature=0)
    assert nxt["usage"]["kv"]["reused_tokens"] >= seq - 2 and nxt["choices"][0]["message"]["content"].strip()


def test_configure_and_bad_budget_lose_nothing(llm):
    llm.create_chat_completion(STORY, max_tokens=20, temperature=0)
    seq = llm.kv_stats()["sequence_tokens"]
    with pytest.raises(BudgetError, match="at least 37"):
        llm.configure(budget=20)
    assert llm.kv_stats()["sequence_tokens"] == seq and llm.kv_stats()["budget"] == 48
    llm.configure(policy="h2o", budget=40, buffer=8)
    r = llm.create_chat_completion(STORY, max_tokens=60, temperature=0)
    kv = r["usage"]["kv"]
    assert (kv["policy"], kv["budget"], kv["buffer"], kv["reused_tokens"]) == ("h2o", 40, 8, 0)
    assert kv["max_used_cells"] == 48
    with pytest.raises(ValueError, match="unknown policy"):
        llm.configure(policy="lru")


def test_budget_in_mib(model):
    with InfoKVLlama(model, budget_mib=1.0, buffer=16) as x:
        kv = x.kv_stats()
        assert kv["budget"] == 2**20 // kv["kv_bytes_per_token"]
        assert InfoKVLlama.budget_mib_for(model, kv["budget"]) <= 1.0


def test_cache_map_marks_evicted_and_scored_tokens(llm):
    llm.create_chat_completion(STORY, max_tokens=60, temperature=0)
    cm = llm.cache_map()
    kv = llm.kv_stats()
    assert len(cm.pieces) == kv["sequence_tokens"] and cm.in_cache.sum() == kv["used_cells"]
    assert cm.evicted.sum() == kv["evicted_tokens"] and not (cm.evicted & cm.in_cache).any()
    assert (~cm.in_cache & ~cm.evicted).sum() == 1  # max_tokens reached: the last token is not decoded yet
    assert cm.protected.sum() == 4 + 32 and cm.protected[:4].all() and cm.protected[-33:-1].all()
    scored = cm.in_cache & ~cm.protected
    assert np.isfinite(cm.score[scored]).all() and np.isnan(cm.score[~cm.in_cache]).all()


def test_chat_template_comes_from_the_gguf(llm, model):
    assert llm._chat_formatter().template == model.meta("tokenizer.chat_template")
    r = llm.create_chat_completion([{"role": "system", "content": "Answer in French."}] + STORY, max_tokens=1)
    prompt = llm._chat_formatter()(messages=[{"role": "system", "content": "Answer in French."}] + STORY).prompt
    assert "<|im_start|>system\nAnswer in French.<|im_end|>" in prompt
    assert r["usage"]["prompt_tokens"] == len(llm.tokenize(prompt.encode(), add_bos=False, special=True))


def test_close_frees_and_keeps_a_shared_model(model):
    x = InfoKVLlama(model, budget=48, buffer=16)
    x.close()
    with pytest.raises(ValueError, match="closed"):
        x.create_completion("hi")
    assert model.tokenize("hi")  # the shared model is still loaded


def test_owned_model_is_closed(model_path):
    with InfoKVLlama(model_path, budget=48, buffer=16) as x:
        assert x.create_completion("Hello", max_tokens=2)["usage"]["completion_tokens"] == 2
    assert x.model._ptr is None


def _hf_cache(tmp_path, model_path):
    """A Hugging Face cache as huggingface-hub lays it out, holding the test model."""
    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "smollm2-135m-instruct-q4_1.gguf").symlink_to(model_path)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return tmp_path


def test_from_pretrained_offline_uses_the_cache(tmp_path, model_path):
    home = _hf_cache(tmp_path, model_path)
    code = ("from infokv_local import InfoKVLlama\n"
            "llm = InfoKVLlama.from_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct-GGUF', '*q4_1.gguf', budget=48, "
            "buffer=16)\n"
            "print(llm.create_completion('The capital of France is', max_tokens=4, temperature=0)['choices'][0]"
            "['text'])\n"
            "llm.close()\n"
            "InfoKVLlama.from_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct-GGUF', 'other.gguf')\n")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "Paris" in res.stdout, res.stderr
    assert res.returncode == 1 and "ModelFileError" in res.stderr
    assert "not in the local Hugging Face cache" in res.stderr


def test_utf8_and_stop_helpers():
    u = Utf8Pieces()
    data = "é€😀".encode()
    out = "".join(u.push(data[i:i + 1]) for i in range(len(data))) + u.flush()
    assert out == "é€😀"
    s = StopMatcher(["</end>", "STOP"])
    parts = [s.push(p) for p in ["hello </", "en", "d> tail"]]
    assert parts == [("hello ", False), ("", False), ("", True)]
    s = StopMatcher(["STOP"])
    assert s.push("ST") == ("", False) and s.push("ay") == ("STay", False) and s.flush() == ""


def test_full_policy_ends_with_length_when_its_context_is_full(model):
    with InfoKVLlama(model, policy="full", n_ctx=64) as x:
        r = x.create_completion("Once upon a time", max_tokens=100, temperature=0)
        assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["kv"]["max_used_cells"] == 64
        assert r["usage"]["completion_tokens"] < 100
        with pytest.raises(ContextFullError, match="does not evict"):
            x.create_completion("word " * 100, max_tokens=10)
        assert x.create_completion("Hello", max_tokens=3)["usage"]["completion_tokens"] == 3  # still usable


def test_cache_map_pieces_keep_split_characters_whole(llm):
    llm.create_completion("Emoji: 😀🚀 café", max_tokens=1, temperature=0)
    cm = llm.cache_map()
    assert "😀" in "".join(cm.pieces) and "\ufffd" not in "".join(cm.pieces)
