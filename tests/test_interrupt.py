"""Cancellation never costs the conversation: Ctrl-C in the chat, SIGINT at any moment of a decode, a
stream closed early. Real model, real patched llama.cpp, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from infokv_local import InfoKVLlama
from infokv_local.cli.chat import AT_PROMPT
from infokv_local.engine import Engine
from infokv_local.engine.interrupts import sigint_deferred

CLI = [sys.executable, "-m", "infokv_local"]


def assert_consistent(eng: Engine) -> None:
    """llama.cpp's cells and the engine's records describe the same sequence."""
    cells, pos = eng.ctx.cell_map()
    assert len(cells) == eng.used_cells
    idx = eng.cells.token[cells]
    assert (idx >= 0).all(), "a cell llama.cpp holds that the engine never recorded"
    assert len(np.unique(idx)) == len(idx)
    n_decoded = len(eng.tokens) - (eng.pending_token is not None)
    assert eng.totals.tokens == n_decoded
    assert idx.max() == n_decoded - 1 and pos.max() == eng.n_past - 1  # the newest token is cached, at n_past - 1


def test_sigint_is_held_back_inside_a_block_and_delivered_after(sigint_delivered):
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            signal.raise_signal(signal.SIGINT)
            reached.append("after the signal")  # the block runs to its end
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_at_random_moments_never_desynchronises_the_engine(model, sigint_delivered):
    """Interrupt generation 25 times at random moments (inside llama_decode most of the time): each
    time the engine's records match llama.cpp's cells and the conversation goes on."""
    rng = np.random.default_rng(7)
    prompt = model.tokenize("Write a very long story about a lighthouse keeper and a storm.")
    with Engine(model, "infokv", budget=48, buffer=16, n_recent=8, check_invariants=True) as eng:
        eng.prefill(prompt)
        interrupted = 0
        for _ in range(25):
            timer = threading.Timer(float(rng.uniform(0.0, 0.15)), os.kill, (os.getpid(), signal.SIGINT))
            try:
                timer.start()
                for _ in eng.generate([], 40, ignore_eos=True):
                    pass
                timer.join()
                for _ in range(1000):  # the handler runs between bytecodes: here at the latest
                    pass
            except KeyboardInterrupt:
                interrupted += 1
            timer.join()
            assert_consistent(eng)
        assert interrupted >= 20
        out = list(eng.generate([], 20, ignore_eos=True))  # and it still generates
        assert len(out) == 20
        assert_consistent(eng)


def test_stream_closed_early_leaves_the_object_usable(model):
    with InfoKVLlama(model, budget=48, buffer=16, n_recent=8, check_invariants=True) as llm:
        stream = llm.create_completion("Write a long story about a dragon.", max_tokens=200, stream=True,
                                       temperature=0)
        for i, _ in enumerate(stream):
            if i == 60:
                break
        stream.close()
        cm = llm.cache_map()
        e = llm.engine
        assert len(cm.pieces) == len(e.tokens)
        assert cm.in_cache.sum() == llm.kv_stats()["used_cells"] == e.used_cells
        assert not (cm.in_cache & cm.evicted).any()
        assert (cm.in_cache | cm.evicted).sum() == len(e.tokens) - (e.pending_token is not None)
        assert_consistent(e)
        out = llm.create_completion("Once upon a time", max_tokens=20, temperature=0)
        assert out["usage"]["completion_tokens"] == 20
        assert_consistent(llm.engine)


class _Reader(threading.Thread):
    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.data = stream, b""

    def run(self) -> None:
        while chunk := os.read(self.stream.fileno(), 4096):
            self.data += chunk

    def wait_for(self, what: callable, timeout: float, why: str, proc: subprocess.Popen) -> None:
        end = time.monotonic() + timeout
        while not what():
            assert proc.poll() is None, f"the chat exited ({proc.returncode}) while waiting for {why}"
            assert time.monotonic() < end, f"timed out waiting for {why}: {self.data[-3000:]!r}"
            time.sleep(0.01)


def test_ctrl_c_in_the_chat_stops_the_answer_and_keeps_the_conversation(sigint_delivered):
    """`chat --budget 128 --buffer 32 --ignore-eos`: Ctrl-C (SIGINT) while each of three long answers streams,
    one at the input prompt, then ask something else: it answers, and the chat exits 0 at the end of its input.
    Every turn after the first reuses the whole history before it, interrupted answers included: the cache of
    an interrupted answer is kept.
    (--ignore-eos: an answer ends only at --max-tokens, so the signal never races the end of an answer; greedy
    output differs between CPUs, and on one CI machine the answer was "A long story", 13 bytes.)"""
    proc = subprocess.Popen([*CLI, "chat", "--budget", "128", "--buffer", "32", "--max-tokens", "400",
                             "--temperature", "0", "--ignore-eos"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)
    out.start()
    err.start()
    done = b"tokens of history reused]"
    try:
        err.wait_for(lambda: b"Ctrl-C stops an answer" in err.data, 180, "the chat to start", proc)
        for i in range(3):
            n0, n_done = len(out.data), err.data.count(done)
            proc.stdin.write(f"Tell me a very long story about a dragon number {i + 1}.\n".encode())
            proc.stdin.flush()
            out.wait_for(lambda n0=n0: len(out.data) >= n0 + 40, 180, "the answer to stream", proc)
            assert err.data.count(done) == n_done, "an answer of 400 tokens ended early"
            proc.send_signal(signal.SIGINT)
            err.wait_for(lambda n_done=n_done: err.data.count(done) == n_done + 1, 60, "the summary", proc)
        assert err.data.count(b"[stopped]") == 3, err.data.decode(errors="replace")
        n_hint = err.data.count(AT_PROMPT.encode())
        time.sleep(0.5)  # waiting at the prompt now
        proc.send_signal(signal.SIGINT)
        err.wait_for(lambda: err.data.count(AT_PROMPT.encode()) == n_hint + 1, 60, "the reminder", proc)
        n0 = len(out.data)
        proc.stdin.write(b"Thank you. What is the capital of France?\n")
        proc.stdin.close()
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out.join(5)
    err.join(5)
    text = err.data.decode(errors="replace")
    assert rc == 0, text
    assert "error" not in text.lower() and "Traceback" not in text, text
    assert text.count("tokens of history reused]") == 4, text
    answer = out.data[n0:].decode(errors="replace")
    assert len(answer.split()) > 100, "the last answer was not generated to --max-tokens"
    reused = [int(ln.split("; ")[-1].split()[0]) for ln in text.splitlines() if "tokens of history reused]" in ln]
    # each turn continued the conversation's cache, the interrupted answer before it included
    assert reused[0] == 0 and reused[1] > 0 and reused[2] > reused[1] and reused[3] > reused[2], text
