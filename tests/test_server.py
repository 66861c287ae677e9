"""``python -m infokv_local serve`` through real HTTP with the official ``openai`` client.

The real server runs as a subprocess on 127.0.0.1 (a free port) with the real SmolLM2-135M and the
patched llama.cpp; one thread per slot (the test machine is shared and small). Every request loop
is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from infokv_local import InfoKVLlama
from infokv_local.engine import kv_bytes_per_token
from infokv_local.settings import DEFAULTS

KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file name is the model id
BUDGET, BUFFER = 48, 16
CAP = BUDGET + BUFFER
SMALL = ["--budget", str(BUDGET), "--buffer", str(BUFFER), "--threads", "1"]
X1 = [{"role": "user", "content": "Write a short story about a fox who lives in a quiet forest."}]
X2 = "Now give the fox a name and say why."
Y1 = [{"role": "user", "content": "List three things you can find at the seaside."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(*args: str) -> Iterator[str]:
    """A server started with ``args``; yields its base URL and stops it afterwards."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "infokv_local", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=300)


def kv_view(base: str) -> dict:
    r = httpx.get(f"{base}/v1/kv", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200
    return r.json()


def kv_of(usage: object) -> dict:
    return usage.model_dump()["kv"]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def one_slot() -> Iterator[str]:
    with serve(*SMALL, "--slots", "1", "--queue", "1", "--api-key", KEY, "--max-body-kib", "16") as base:
        yield base


@pytest.fixture(scope="module")
def reference(model) -> dict[str, str]:
    """Replies through the Python API in this process, never parked (greedy), under the server's default policy."""
    with InfoKVLlama(model, policy=DEFAULTS.policy, budget=BUDGET, buffer=BUFFER, n_threads=1) as llm:
        r1 = llm.create_chat_completion(X1, max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
        turn2 = X1 + [{"role": "assistant", "content": r1}, {"role": "user", "content": X2}]
        second = llm.create_chat_completion(turn2, max_tokens=24, temperature=0)
        llm.reset()
        y = llm.create_chat_completion(Y1, max_tokens=12, temperature=0)["choices"][0]["message"]["content"]
    return {"x1": r1, "x2": second["choices"][0]["message"]["content"],
            "x2_reused": second["usage"]["kv"]["reused_tokens"], "y1": y}


def test_chat_and_completion_streaming_and_not(one_slot):
    c = client(one_slot)
    models = c.models.list()
    assert [m.id for m in models.data] == [MODEL]
    r = c.chat.completions.create(model=models.data[0].id, messages=Y1, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 12
    kv = kv_of(r.usage)
    assert (kv["policy"], kv["budget"], kv["buffer"], kv["slot"]) == (DEFAULTS.policy, BUDGET, BUFFER, 0)
    assert kv["max_used_cells"] <= CAP

    chunks = list(c.chat.completions.create(messages=Y1, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            model=MODEL))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content  # same request, same greedy answer, streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert kv_of(chunks[-1].usage)["max_used_cells"] <= CAP

    comp = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                temperature=0)
    assert comp.choices[0].text and comp.usage.prompt_tokens > 3 and kv_of(comp.usage)["used_cells"] > 0
    streamed = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                    temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == comp.choices[0].text

    short = c.chat.completions.create(model=MODEL, messages=Y1, max_completion_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    counted = c.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert counted.choices[0].finish_reason == "stop" and " 7" not in counted.choices[0].text
    assert " 5" in counted.choices[0].text


def test_raw_sse_ends_with_done_and_extension_fields_are_not_fatal(one_slot):
    body = {"messages": Y1, "max_tokens": 4, "temperature": 0, "stream": True, "top_k": 20, "min_p": 0.1,
            "repeat_penalty": 1.1, "cache_prompt": True, "chat_template_kwargs": {"enable_thinking": False},
            "presence_penalty": 0.5, "frequency_penalty": 0.5, "seed": 3}
    with httpx.stream("POST", f"{one_slot}/v1/chat/completions", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][len("data: "):])
    assert final["choices"][0]["finish_reason"] and final["usage"]["kv"]["max_used_cells"] <= CAP


def test_multi_turn_reuses_the_slot_cache_and_parking_restores_it_exactly(one_slot, reference):
    c = client(one_slot)
    r1 = c.chat.completions.create(model=MODEL, messages=X1, max_tokens=24, temperature=0)
    assert r1.choices[0].message.content == reference["x1"]
    kv1 = kv_of(r1.usage)
    assert kv1["evicted_tokens"] > 0  # the budget was hit: what is parked is a compressed cache
    conv = kv1["conversation"]

    y = c.chat.completions.create(model=MODEL, messages=Y1, max_tokens=12, temperature=0)
    assert y.choices[0].message.content == reference["y1"]
    # the same first message was answered (and parked) by earlier tests: all of it but its last token is reused
    assert kv_of(y.usage)["conversation"] != conv and kv_of(y.usage)["reused_tokens"] in (0, y.usage.prompt_tokens - 1)
    view = kv_view(one_slot)
    assert conv in [p["conversation"] for p in view["parked"]["conversations"]]

    msgs = X1 + [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": X2}]
    r2 = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
    kv2 = kv_of(r2.usage)
    assert kv2["conversation"] == conv and kv2["restored"] is True
    assert r2.choices[0].message.content == reference["x2"]  # as if it had never been parked
    # no prefill of the history: only the new turn is decoded, exactly as without parking
    assert kv2["reused_tokens"] == reference["x2_reused"] == kv1["sequence_tokens"]
    assert r2.model_dump()["timings"]["prompt_n"] == r2.usage.prompt_tokens - kv2["reused_tokens"]
    assert kv2["evicted_tokens"] >= kv1["evicted_tokens"] and kv2["max_used_cells"] <= CAP

    # a third turn continues in the same slot, nothing parked or restored
    msgs += [{"role": "assistant", "content": r2.choices[0].message.content}, {"role": "user", "content": "Thanks!"}]
    r3 = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    kv3 = kv_of(r3.usage)
    assert kv3["conversation"] == conv and kv3["restored"] is False and kv3["reused_tokens"] > kv2["reused_tokens"]


def test_each_request_goes_where_most_of_its_prompt_is_cached():
    """Two users open with the same message: the second is a regenerated first answer as far as the cache can
    tell, so it keeps all of that prompt but its last token in the first user's slot and parks the first
    conversation; each next turn finds its own conversation (told apart by the answers, not the shared first
    prompt) with its whole history reused, the first user's restored. A regenerated answer reuses the history
    before it and parks the conversation it leaves; continuing that one restores it with nothing prefilled."""
    with serve("--budget", "200", "--buffer", "16", "--threads", "1", "--slots", "2", "--queue", "4",
               "--prompt-probe") as base:
        c = client(base, key="unused")
        assert c.models.list().data[0].model_dump()["prompt_probe"] is True and kv_view(base)["prompt_probe"] is True

        def turn(messages: list, seed: int) -> tuple[str, dict]:
            r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0.9, seed=seed)
            return r.choices[0].message.content or "", {**kv_of(r.usage), "prompt_tokens": r.usage.prompt_tokens}

        def then(history: list, answer: str, user: str) -> list:
            return history + [{"role": "assistant", "content": answer}, {"role": "user", "content": user}]

        def parked() -> list[str]:
            return [p["conversation"] for p in kv_view(base)["parked"]["conversations"]]

        a1, kv_a1 = turn(X1, 1)
        b1, kv_b1 = turn(X1, 2)
        assert a1 != b1 and kv_b1["slot"] == kv_a1["slot"] and kv_b1["conversation"] != kv_a1["conversation"]
        assert kv_b1["reused_tokens"] == kv_a1["prompt_tokens"] - 1 and parked() == [kv_a1["conversation"]]
        a2, kv_a2 = turn(then(X1, a1, X2), 3)
        assert (kv_a2["conversation"], kv_a2["restored"]) == (kv_a1["conversation"], True)
        assert kv_a2["slot"] != kv_a1["slot"] and kv_a2["reused_tokens"] == kv_a1["sequence_tokens"]
        b2, kv_b2 = turn(then(X1, b1, X2), 4)
        assert (kv_b2["slot"], kv_b2["conversation"]) == (kv_b1["slot"], kv_b1["conversation"])
        assert kv_b2["restored"] is False
        assert kv_b2["reused_tokens"] == kv_b1["sequence_tokens"] and not parked()

        # the answer to A's second turn regenerated: its prompt but the last token is reused, A's conversation parked
        a2_again, kv_fork = turn(then(X1, a1, X2), 9)
        assert a2_again != a2 and kv_fork["slot"] == kv_a2["slot"]
        assert kv_fork["conversation"] not in (kv_a1["conversation"], kv_b1["conversation"])
        assert kv_fork["reused_tokens"] == kv_a2["prompt_tokens"] - 1 and parked() == [kv_a1["conversation"]]

        # A goes on from its first answer after all: restored (into the least recently used slot, B's)
        _, kv_a3 = turn(then(then(X1, a1, X2), a2, "More."), 5)
        assert kv_a3["conversation"] == kv_a1["conversation"] and kv_a3["restored"] is True
        assert kv_a3["slot"] == kv_b1["slot"] and kv_a3["reused_tokens"] == kv_a2["sequence_tokens"]
        _, kv_b3 = turn(then(then(X1, b1, X2), b2, "More."), 6)
        assert kv_b3["conversation"] == kv_b1["conversation"] and kv_b3["restored"] is True
        assert kv_b3["reused_tokens"] == kv_b2["sequence_tokens"]


def test_a_client_disconnect_cancels_the_generation_and_frees_the_slot(one_slot):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{one_slot}/v1/completions", json=body, headers=headers, timeout=300) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        for ln in lines:
            got += ln.startswith("data: ")
            if got >= 3:
                break
    # the connection is closed: the slot comes back idle long before 3000 tokens
    deadline = time.monotonic() + 120
    while True:
        view = kv_view(one_slot)
        if view["slots"][0]["state"] == "idle":
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.3)
    assert view["slots"][0]["kv"]["sequence_tokens"] < 1500
    assert view["slots"][0]["conversation"] is not None  # the cut conversation can go on
    m = httpx.get(f"{one_slot}/metrics", headers=headers, timeout=30).text
    assert int(re.search(r"^infokv_cancelled_total (\d+)", m, re.M).group(1)) >= 1
    r2 = client(one_slot).completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert r2.choices[0].finish_reason in ("length", "stop")


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_requests_get_openai_shaped_errors(one_slot):
    c = client(one_slot)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=Y1, temperature=5)
    assert _error(e.value)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=Y1, n=2)
    assert _error(e.value)["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=Y1, max_tokens=4,
                                  extra_body={"infokv": {"budget": BUDGET * 2}})
    assert _error(e.value)["param"] == "infokv.budget"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=Y1, extra_body={"infokv": {"policy": "lru"}})
    assert _error(e.value)["param"] == "infokv.policy"
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=Y1)
    assert _error(e.value)["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as e:
        client(one_slot, key="wrong").models.list()
    assert _error(e.value)["code"] == "invalid_api_key"
    assert httpx.get(f"{one_slot}/v1/kv", timeout=30).status_code == 401
    assert httpx.get(f"{one_slot}/health", timeout=30).status_code == 200  # no key needed
    headers = {"Authorization": f"Bearer {KEY}"}
    big = httpx.post(f"{one_slot}/v1/completions", headers=headers, timeout=30,
                     json={"prompt": "x" * 20000, "max_tokens": 1})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    bad = httpx.post(f"{one_slot}/v1/completions", headers={**headers, "Content-Type": "application/json"},
                     content=b"{not json", timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{one_slot}/v1/nothing", headers=headers, timeout=30).status_code == 404
    # a per-request policy and smaller budget are honoured
    r = c.chat.completions.create(model=MODEL, messages=Y1, max_tokens=4,
                                  extra_body={"infokv": {"policy": "h2o", "budget": 40}})
    kv = kv_of(r.usage)
    assert (kv["policy"], kv["budget"]) == ("h2o", 40)


def test_logit_bias_as_openai_names_it(one_slot, model):
    c = client(one_slot)
    banana = model.tokenize(" banana", add_special=False, parse_special=False)[0]
    r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0,
                             logit_bias={str(banana): 100})
    assert r.choices[0].text == " banana banana"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="Hello", max_tokens=2, logit_bias={str(banana): 101})
    assert _error(e.value)["param"].startswith("logit_bias")
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="Hello", max_tokens=2, logit_bias={"999999999": -100})
    assert "outside the vocabulary" in _error(e.value)["message"]


def test_a_full_queue_answers_503_with_retry_after(one_slot):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 3000, "temperature": 0, "stream": True}
    queued: list[object] = []
    with httpx.stream("POST", f"{one_slot}/v1/completions", json=body, headers=headers, timeout=300) as r:
        lines = r.iter_lines()  # kept: dropping a half-read iterator closes the connection
        next(lines)  # the only slot is generating
        t = threading.Thread(target=lambda: queued.append(client(one_slot).completions.create(
            model=MODEL, prompt="Hi", max_tokens=2)))
        t.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{one_slot}/health", timeout=30).json()["queue"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with pytest.raises(openai.APIStatusError) as e:
            client(one_slot).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) > 0
        assert _error(e.value)["code"] == "queue_full"
    t.join(timeout=240)  # the disconnect above freed the slot for the queued request
    assert not t.is_alive() and len(queued) == 1


def test_concurrent_clients_stay_inside_slots_times_budget(model):
    prompts = [f"Write one sentence about the number {n}." for n in (3, 7, 11, 19)]
    with InfoKVLlama(model, policy=DEFAULTS.policy, budget=BUDGET, buffer=BUFFER, n_threads=1) as llm:
        expected = [llm.create_completion(p, max_tokens=16, temperature=0)["choices"][0]["text"] for p in prompts]
    with serve(*SMALL, "--slots", "2", "--queue", "8") as base:
        c = client(base, key="unused")
        results: dict[int, object] = {}
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                results[i] = c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=16,
                                                  temperature=0, stream=i % 2 == 1)
                if i % 2:
                    results[i] = "".join(ch.choices[0].text for ch in results[i] if ch.choices)  # type: ignore
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        peak, polls = 0, 0
        deadline = time.monotonic() + 300
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            view = httpx.get(f"{base}/v1/kv", timeout=30).json()
            assert view["cells_limit"] == 2 * CAP
            peak = max(peak, view["cells_used"], sum(s["kv"].get("max_used_cells", 0) for s in view["slots"]))
            polls += 1
            time.sleep(0.1)
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        texts = [r if isinstance(r, str) else r.choices[0].text for r in (results[i] for i in range(4))]
        assert texts == expected
        assert polls > 0 and 0 < peak <= 2 * CAP
        m = httpx.get(f"{base}/metrics", timeout=30).text
        assert 'infokv_requests_total{endpoint="/v1/completions",status="200"} 4' in m
        assert "infokv_kv_cells_limit 128" in m and "infokv_completion_tokens_total " in m
        assert "infokv_checkpoint_bytes 0" in m  # a dense memory keeps none

        # two long replies at once: the two slots' generation steps are decoded together
        before = kv_view(base)["batching"]
        assert before["together"] is True and before["layout"] == "streams"
        ban = {str(model.eos_token_id): -100}
        pair = [threading.Thread(target=lambda i=i: c.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=96, temperature=0, logit_bias=ban)) for i in (0, 1)]
        for t in pair:
            t.start()
        for t in pair:
            t.join(timeout=120)
        after = kv_view(base)["batching"]
        steps = after["batched_steps"] - before["batched_steps"]
        tokens = after["batched_tokens"] - before["batched_tokens"]
        assert 0 < steps < tokens <= 2 * steps  # some steps held both slots' tokens, none more than two
        m = httpx.get(f"{base}/metrics", timeout=30).text
        assert f"infokv_batched_tokens_total {after['batched_tokens']}" in m

        # the slots share one context: a policy whose statistics it does not collect is refused, with the reason
        with pytest.raises(openai.BadRequestError, match="turn flash attention off for every slot"):
            c.completions.create(model=MODEL, prompt=prompts[0], max_tokens=4, extra_body={"infokv": {"policy": "h2o"}})
        r = c.completions.create(model=MODEL, prompt=prompts[0], max_tokens=4, temperature=0,
                                 extra_body={"infokv": {"policy": "snapkv"}})
        assert r.usage.completion_tokens == 4 and kv_of(r.usage)["policy"] == "snapkv"


def test_engine_restore_continues_exactly_even_with_no_new_token(model, long_tokens):
    """The snapshot/restore behind parking: a compressed sequence with holes, restored into another
    engine, gives the same greedy tokens, including when it continues with no new token (the last
    token's logits are not saved and are recomputed)."""
    from infokv_local.engine import Engine

    with Engine(model, "infokv", budget=BUDGET, buffer=BUFFER, n_threads=1) as a, \
            Engine(model, "infokv", budget=BUDGET, buffer=BUFFER, n_threads=1) as b:
        a.prefill(long_tokens[:300])
        assert a.totals.evicted_tokens > 0
        snap = a.snapshot()
        b.prefill(long_tokens[500:520])  # something else first
        b.restore(snap)
        assert (b.ctx.cell_map()[0] == a.ctx.cell_map()[0]).all()  # the same cells, holes included
        assert b.n_past == a.n_past and b.tokens == a.tokens
        assert list(b.generate([], 24)) == list(a.generate([], 24))
        with Engine(model, "h2o", budget=BUDGET, buffer=BUFFER, n_threads=1) as other:
            with pytest.raises(ValueError, match="snapshot of an engine configured"):
                other.restore(snap)


def test_serve_refuses_bad_options_clearly():
    res = subprocess.run([sys.executable, "-m", "infokv_local", "serve", "--policy", "full"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "does not evict" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "infokv_local", "serve", "--model", "/nonexistent/x.gguf"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Model file not found" in res.stderr
    for bad, why in ((["--cache-type-v", "q9"], "not a KV-cache type"), (["--rpc", "x"], "is not HOST:PORT")):
        res = subprocess.run([sys.executable, "-m", "infokv_local", "serve", *bad], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2 and why in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_serve_with_a_quantized_cache(model):
    """``--cache-type-k/v q8_0``: answers, and the KV bytes are the quantized ones (34/64 of f16's)."""
    with serve(*SMALL, "--cache-type-k", "q8_0", "--cache-type-v", "q8_0") as base:
        r = client(base, key="unused").chat.completions.create(model=MODEL, messages=Y1, max_tokens=80,
                                                                temperature=0)
        kv = kv_of(r.usage)
    assert r.choices[0].message.content and kv["evictions"] > 0
    assert kv["kv_bytes"] * 64 == kv["used_cells"] * 34 * kv_bytes_per_token(model)


def test_parking_store_is_bounded_least_recently_parked_first(model):
    from infokv_local.server.slots import Parked, ParkingStore

    with InfoKVLlama(model, policy="infokv", budget=BUDGET, buffer=BUFFER, n_threads=1) as llm:
        states = []
        for word in ("sea", "fox", "moon"):
            llm.create_completion(f"A poem about the {word}:", max_tokens=4, temperature=0)
            states.append(Parked(f"conv-{word}", llm.export_state()))
    size = max(p.nbytes for p in states)
    store = ParkingStore(max_bytes=int(2.5 * size))
    for p in states:
        assert store.put(p)
    assert len(store) == 2 and store.dropped == 1 and store.nbytes <= store.max_bytes
    assert store.find("A poem about the sea: and more") == (None, 0)  # dropped first
    got, kept = store.find("A poem about the moon: the moon is")
    assert got is not None and got.conversation == "conv-moon" and kept > 0
    store.remove(got)
    assert len(store) == 1 and store.find("A poem about the moon: the moon is") == (None, 0)
    assert not ParkingStore(max_bytes=size // 2).put(states[0])  # larger than the whole store


def test_soak_tool_keeps_every_slot_in_its_budget(tmp_path):
    """``python -m evaluation.server_soak`` on a tiny scale: two simultaneous multi-turn conversations,
    cells sampled from /v1/kv never above slots x (budget + buffer), and a parked one restored."""
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "-m", "evaluation.server_soak", "--slots", "2", "--conversations", "2",
                        "--tokens", "240", "--turn-tokens", "120", "--budget", "48", "--buffer", "16", "--threads", "1",
                        "--every", "0.2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["generated_tokens"] == 480 and len(res["turns"]) == 4
    assert res["samples"] and 0 < res["max_used_cells_sampled"] <= res["cells_limit"] == 2 * 64
    assert res["max_used_cells_per_turn"] <= 64
    assert all(t["reused_tokens"] > 0 for t in res["turns"] if t["prompt_tokens"] > 100)  # later turns reuse
    assert res["resumed"]["restored"] is True and res["resumed"]["reused_tokens"] > 0
