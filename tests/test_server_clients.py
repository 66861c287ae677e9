"""``serve`` under impatient and hostile clients, over real HTTP: clients that hang up while queued or while
a huge prompt is read, prompts over the limit, SIGTERM with requests in flight, and a fuzz of the API.

Real server subprocesses (SmolLM2-135M, patched llama.cpp, one thread). Time figures are printed (``-s``);
the deadlines asserted are liveness bounds (nothing stuck), far above the measured times.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import types
import typing
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from infokv_local.server.schemas import ChatCompletionRequest, CompletionRequest

from .test_server import MODEL, _free_port, client, serve

LONG = {"prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 3000, "temperature": 0, "stream": True}
HUGE = "a" * 3_000_000  # one word of 3 million characters: under the 4 MiB body limit


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return float(re.search(rf"^{name} (\S+)", text, re.M).group(1))


def wait_until(what, timeout: float, why: str) -> float:
    """Seconds until ``what()`` held (fails after ``timeout``)."""
    t0 = time.monotonic()
    while not what():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {why}"
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def no_limit() -> typing.Iterator[str]:
    """One slot, no limit on prompt tokens: a huge prompt is read until its client goes."""
    with serve("--budget", "48", "--buffer", "16", "--threads", "1", "--slots", "1", "--queue", "16",
               "--max-prompt-tokens", "0") as base:
        yield base


@pytest.fixture(scope="module")
def default_limit() -> typing.Iterator[str]:
    """Two slots with the defaults' prompt limit (measured at start)."""
    with serve("--budget", "48", "--buffer", "16", "--threads", "1", "--slots", "2", "--queue", "4") as base:
        yield base


def test_clients_that_hang_up_while_queued_leave_the_queue_at_once(no_limit):
    base = no_limit
    with httpx.stream("POST", f"{base}/v1/completions", json=LONG, timeout=300) as busy:
        lines = busy.iter_lines()
        next(lines)  # the only slot is generating 3000 tokens

        timeouts: list[bool] = []

        def impatient() -> None:
            try:  # hangs up after one second
                with httpx.stream("POST", f"{base}/v1/completions", json=LONG, timeout=1.0) as r:
                    r.read()
            except httpx.ReadTimeout:
                timeouts.append(True)

        threads = [threading.Thread(target=impatient) for _ in range(8)]
        for t in threads:
            t.start()
        wait_until(lambda: httpx.get(f"{base}/health", timeout=30).json()["queue"] == 8, 30, "8 queued")
        for t in threads:
            t.join()
        assert len(timeouts) == 8
        left = wait_until(lambda: httpx.get(f"{base}/health", timeout=30).json()["queue"] == 0, 30, "the queue")
        print(f"\nqueue empty {left:.3f} s after the 8 clients hung up")
        assert metric(base, "infokv_cancelled_total") == 8
    t0 = time.monotonic()  # the busy client hung up too: a short request is answered now
    r = client(base, key="unused").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    print(f"a short request answered in {time.monotonic() - t0:.2f} s")
    assert r.choices[0].finish_reason in ("length", "stop")
    assert httpx.get(f"{base}/health", timeout=30).json() == {"status": "ok", "slots": 1, "slots_idle": 1,
                                                               "queue": 0}


def test_a_huge_prompt_whose_client_gives_up_frees_the_slot(no_limit):
    base = no_limit
    cancelled = metric(base, "infokv_cancelled_total")
    for stream in (False, True):
        with pytest.raises(httpx.ReadTimeout):  # gives up after 3 s: tokenized, then being read
            httpx.post(f"{base}/v1/completions", json={"prompt": HUGE, "max_tokens": 4, "stream": stream},
                       timeout=httpx.Timeout(60, read=3.0))
        t0 = time.monotonic()
        r = client(base, key="unused").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        print(f"\nafter a 3 MB prompt given up after 3 s (stream={stream}): a short request answered in "
              f"{time.monotonic() - t0:.2f} s")
        assert r.choices[0].finish_reason in ("length", "stop")
    assert metric(base, "infokv_cancelled_total") == cancelled + 2
    view = httpx.get(f"{base}/v1/kv", timeout=30).json()
    assert view["slots"][0]["state"] == "idle" and view["queue"] == 0


def test_prompts_over_the_limit_get_a_400_at_once(default_limit):
    base = default_limit
    c = client(base, key="unused")
    for path, body, param in (("/v1/completions", {"prompt": HUGE, "max_tokens": 1}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": HUGE}]}, "messages")):
        for stream in (False, True):
            t0 = time.monotonic()
            r = httpx.post(f"{base}{path}", json={**body, "stream": stream}, timeout=60)
            print(f"\n{path} 3 MB prompt (stream={stream}): {r.status_code} in {time.monotonic() - t0:.2f} s")
            err = r.json()["error"]
            assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == param, err
            assert "--max-prompt-tokens" in err["message"]
    limit = int(re.search(r"over the limit of (\d+) tokens", err["message"]).group(1))
    assert limit >= 2048
    r = c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)  # the slots are free and well
    assert r.choices[0].finish_reason in ("length", "stop")


def test_an_exact_prompt_limit_and_a_history_longer_than_it(model):
    with serve("--budget", "48", "--buffer", "16", "--threads", "1", "--max-prompt-tokens", "40") as base:
        c = client(base, key="unused")
        words = " ".join(["word"] * 60)
        n = len(model.tokenize(words))
        assert n > 40
        with pytest.raises(Exception) as e:
            c.completions.create(model=MODEL, prompt=words, max_tokens=1)
        assert e.value.status_code == 400 and f"it is {n} tokens" in e.value.response.json()["error"]["message"]
        chat = [{"role": "user", "content": "Count to twenty."}]
        total = 0
        for _ in range(3):  # the conversation outgrows the limit; each turn reads only its new part
            r = c.chat.completions.create(model=MODEL, messages=chat, max_tokens=16, temperature=0)
            total = r.usage.prompt_tokens
            chat += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": "Go on."}]
        assert total > 40 and r.usage.model_dump()["kv"]["reused_tokens"] > 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_with_requests_in_flight_stops_within_seconds(sig):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "infokv_local", "serve", "--port", str(port), "--threads", "1",
                             "--slots", "1", "--max-prompt-tokens", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(base, proc), 180, "the server")
        answers: dict[str, Any] = {}

        def long(kind: str) -> None:
            body = {"prompt": "word " * 100000, "max_tokens": 4, "stream": kind != "plain"}
            try:
                with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                    answers[kind] = (r.status_code, r.read())
            except httpx.HTTPError as e:
                answers[kind] = e

        threads = [threading.Thread(target=long, args=(k,)) for k in ("plain", "stream", "queued")]
        for t in threads:
            t.start()
        wait_until(lambda: httpx.get(f"{base}/health", timeout=30).json()["queue"] == 2, 60, "one read, two queued")
        t0 = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        print(f"\nexit {rc} {time.monotonic() - t0:.2f} s after {signal.Signals(sig).name}")
        assert rc == (-signal.SIGTERM if sig == signal.SIGTERM else 130)
        for t in threads:
            t.join(timeout=60)
        for kind, (status, body) in answers.items():  # each answered: the server is shutting down
            assert status == 503 and json.loads(body)["error"]["code"] == "server_shutdown", (kind, body)
        out = proc.stdout.read()
        assert "Traceback" not in out and "error" not in out.replace("server_shutdown", ""), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(base: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, proc.stdout.read()
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# ---- fuzz ---------------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=3), max_leaves=8)


def _json_for(annotation: Any) -> st.SearchStrategy[Any]:
    """JSON values of a pydantic field's type (its constraints ignored, so that many are out of range)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _json_for(args[0])
    if origin in (typing.Union, types.UnionType):
        return st.one_of([_json_for(a) for a in args])
    if origin is typing.Literal:
        return st.sampled_from(args) | st.text(max_size=10)
    if origin is list:
        return st.lists(_json_for(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(st.integers(-5, 60000).map(str) | st.text(max_size=6), _json_for(args[1]), max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _object_of(annotation)
    return {bool: st.booleans(), int: st.integers(-3, 70000), float: st.floats(-5, 5) | st.integers(-3, 3),
            str: st.text(max_size=40), type(None): st.none()}.get(annotation, JSON)


def _object_of(model: type[BaseModel], wrong_types: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    """Request bodies for ``model``: each field of its type or absent (``wrong_types``: now and then any JSON
    value instead); ``model`` is this server's name or another."""
    def field(name: str, annotation: Any, metadata: list[Any]) -> st.SearchStrategy[Any]:
        typed = _json_for(annotation)
        bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in metadata
                  if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")}
        if bounds and any(t in (int, float) for t in typing.get_args(annotation) + (annotation,)):
            lo, hi = bounds.get("Ge", bounds.get("Gt", -2)), bounds.get("Le", bounds.get("Lt", 3))
            number = st.integers(int(lo) + ("Gt" in bounds), int(hi))
            typed = (number | st.floats(lo, hi, exclude_min="Gt" in bounds)) if float in typing.get_args(
                annotation) + (annotation,) else number
            typed = typed | st.none() if type(None) in typing.get_args(annotation) else typed
        if name == "model":
            typed = st.sampled_from([MODEL, "gpt-4o"])
        return typed | JSON if wrong_types and name not in ("max_tokens", "max_completion_tokens") else typed

    fields = {name: field(name, f.annotation, f.metadata) for name, f in model.model_fields.items()}
    required = {n: s for n, s in fields.items() if model.model_fields[n].is_required()}
    optional = {n: s for n, s in fields.items() if n not in required}
    return st.fixed_dictionaries(required, optional=optional)


def _bounded(body: dict[str, Any]) -> dict[str, Any]:
    """At most two generated tokens (a valid request must not take long): the fuzz is about the input."""
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > 2:
            body[key] = 2
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:  # else: until the end
        body["max_tokens"] = 2
    return body


REQUESTS = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), _object_of(ChatCompletionRequest).map(_bounded).map(json.dumps)),
    st.tuples(st.just("/v1/completions"), _object_of(CompletionRequest).map(_bounded).map(json.dumps)),
    st.tuples(st.just("/v1/chat/completions"),
              _object_of(ChatCompletionRequest, wrong_types=True).map(_bounded).map(json.dumps)),
    st.tuples(st.just("/v1/completions"),
              _object_of(CompletionRequest, wrong_types=True).map(_bounded).map(json.dumps)),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/kv", "/v1/embeddings", "/"]),
              st.binary(max_size=64) | JSON.map(json.dumps)),
)
FUZZ_EXAMPLES = 2000


def test_fuzzed_requests_never_get_a_server_error_nor_hang(default_limit):
    base = default_limit
    seen: dict[int, int] = {}
    t0 = time.monotonic()
    with httpx.Client(base_url=base, timeout=60) as http:

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        @given(REQUESTS)
        def one(request: tuple[str, Any]) -> None:
            path, body = request
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (path, body[:300], r.text[:500])
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
            elif r.headers["content-type"].startswith("text/event-stream"):
                assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]

        one()
    print(f"\n{sum(seen.values())} fuzzed requests in {time.monotonic() - t0:.1f} s: statuses {sorted(seen.items())}")
    assert sum(seen.values()) == FUZZ_EXAMPLES and seen.get(200, 0) > 200
    r = client(base, key="unused").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                            max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert httpx.get(f"{base}/health", timeout=30).json()["queue"] == 0
