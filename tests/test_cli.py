"""``python -m infokv_local``: generate, chat, batch (with resume after a kill), models, help; real model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "infokv_local"]
SMALL = ["--budget", "48", "--buffer", "16"]


def run(*args: str, input: str | None = None, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, input=input, timeout=timeout)


def test_generate_streams_text_and_a_cache_summary():
    res = run("generate", "Say hello.", "--max-tokens", "8", *SMALL, "--policy", "snapkv")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    assert "snapkv, budget 48 + buffer 16: KV cells used" in res.stderr


def test_generate_json_reports_the_whole_run():
    res = run("generate", "Write a long story about a dragon.", "--json", "--max-tokens", "80", *SMALL)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["text"].strip() and out["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 80 and out["usage"]["prompt_tokens"] > 20
    kv = out["kv"]
    assert (kv["policy"], kv["budget"], kv["buffer"]) == ("infokv-rkv", 48, 16)  # the default policy
    assert kv["max_used_cells"] == 64 and kv["evictions"] >= 2 and kv["evicted_tokens"] > 0
    assert kv["kv_bytes"] == kv["used_cells"] * kv["kv_bytes_per_token"]


def test_generate_policy_parameters_and_stop():
    res = run("generate", "Count: 1, 2, 3,", "--raw", "--json", "--max-tokens", "30", "--stop", " 6",
              "--policy", "infokv:alpha=0.9+top_k=0", *SMALL)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["finish_reason"] == "stop" and " 6" not in out["text"] and " 5" in out["text"]


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/x.gguf"], "Model file not found"),
    (["--budget", "20"], "at least 37"),
    (["--policy", "lru"], "unknown policy"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--max-tokens", "0"], "--max-tokens must be positive"),
    (["--hf-repo", "nobody/nothing"], "--hf-repo and --hf-file together"),
])
def test_generate_bad_input_is_a_clear_error(args, message):
    res = run("generate", "hi", *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_hf_download_offline_and_not_cached_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([*CLI, "generate", "hi", "--hf-repo", "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
                          "--hf-file", "smollm2-135m-instruct-q4_1.gguf"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 2 and "not in the local Hugging Face cache" in res.stderr


def test_chat_keeps_the_cache_between_turns():
    res = run("chat", *SMALL, "--max-tokens", "40", "--system", "You are brief.",
              input="Tell me a story about a cat.\n/stats\nWhat was the cat's name?\n/reset\nHi!\n/exit\n")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "tokens of history reused" in ln]
    reused = [int(ln.split("; ")[-1].split()[0]) for ln in lines]
    assert len(reused) == 3 and reused[0] == 0 and reused[1] > 40 and reused[2] == 0  # /reset starts over
    assert "evicted" in res.stderr and res.stdout.count("\n") >= 3


def test_help_at_every_level_has_examples():
    for args in ([], ["generate"], ["chat"], ["batch"], ["models"], ["bench"], ["bench", "fidelity"]):
        res = run(*args, "--help")
        assert res.returncode == 0 and "example" in res.stdout, (args, res.stdout)


def test_models_lists_the_default_and_the_benchmark_models(model_path):
    res = run("models")
    assert res.returncode == 0, res.stderr
    assert str(model_path) in res.stdout
    assert "qwen2.5-coder-1.5b" in res.stdout and "qwen2.5-coder-0.5b" in res.stdout


def test_unknown_registry_model_is_a_clear_error():
    res = run("models", "--fetch", "llama-70b")
    assert res.returncode == 2 and "unknown model" in res.stderr


# ---- batch -------------------------------------------------------------------------------------------
def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_writes_results_and_reports_bad_lines(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [
        {"id": "p1", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0},
        {"id": 2, "messages": [{"role": "user", "content": "Write a poem about the sea."}], "max_tokens": 70},
        {"id": "bad-param", "prompt": "x", "max_token": 3},
        "{not json",
        {"id": "p1", "prompt": "duplicate id"},
        {"id": "h2o", "prompt": "Once upon a time", "policy": "h2o", "budget": 40, "max_tokens": 60},
        {"id": "no-prompt"},
    ])
    res = run("batch", "--input", str(inp), "--output", str(out), *SMALL)
    assert res.returncode == 1, res.stderr  # some lines were invalid
    for n, why in ((3, "unknown parameter 'max_token'"), (4, "not JSON"), (5, "id 'p1' already used on line 1"),
                   (7, 'needs exactly one of "prompt" and "messages"')):
        assert f"in.jsonl:{n}: {why}" in res.stderr, res.stderr
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert set(rows) == {"p1", 2, "h2o"}
    assert "Paris" in rows["p1"]["text"] and rows["p1"]["usage"]["completion_tokens"] <= 6
    assert rows[2]["kv"]["max_used_cells"] == 64 and rows[2]["kv"]["evictions"] >= 1
    assert (rows["h2o"]["kv"]["policy"], rows["h2o"]["kv"]["budget"]) == ("h2o", 40)
    for r in rows.values():
        assert {"id", "text", "finish_reason", "usage", "kv", "timings"} <= set(r)
        assert r["timings"]["total_s"] > 0 and r["kv"]["max_used_cells"] <= r["kv"]["budget"] + 16

    res = run("batch", "--input", str(inp), "--output", str(out), "--strict", *SMALL)
    assert res.returncode == 2 and "nothing was generated (--strict)" in res.stderr
    assert len(read_jsonl(out)) == 3


def kill_batch_after(inp, out, lines: int, *options: str) -> None:
    """Run ``batch`` on ``inp`` and SIGKILL it once ``out`` has ``lines`` result lines (or after 120 s)."""
    proc = subprocess.Popen([*CLI, "batch", "--input", str(inp), "--output", str(out), *SMALL, *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < lines):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_batch_resumes_after_being_killed(tmp_path):
    """One item after another (--parallel 1): sampled texts are then the same in every run; decoded together
    they depend in rare tokens on which items share a step (llama.cpp is not batch-invariant)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    n = 12
    write_jsonl(inp, [{"id": i, "prompt": f"Story number {i}: once upon a time", "max_tokens": 40, "seed": i,
                       "temperature": 0.7} for i in range(n)])
    kill_batch_after(inp, out, 3, "--parallel", "1")
    first = read_jsonl(out)  # every line whole
    assert 3 <= len(first) < n, "the run should have been killed mid-way"
    with out.open("a") as f:  # as if killed in the middle of writing a line
        f.write('{"id": 99, "text": "cut sho')
    res = run("batch", "--input", str(inp), "--output", str(out), *SMALL, "--parallel", "1")
    assert res.returncode == 0, res.stderr
    assert "removing an unfinished last line" in res.stderr
    assert f"{len(first)} already in" in res.stderr
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == list(range(n))
    assert rows[: len(first)] == first  # finished items kept as they were, not redone

    fresh = tmp_path / "fresh.jsonl"  # the same items in one go give the same texts (seeded sampling)
    assert run("batch", "--input", str(inp), "--output", str(fresh), *SMALL, "--parallel", "1").returncode == 0
    assert {r["id"]: r["text"] for r in read_jsonl(fresh)} == {r["id"]: r["text"] for r in rows}


def test_batch_parallel_decodes_items_together_and_resumes(tmp_path):
    """Items of several policies and budgets in one shared context (sized for the largest), a `full` item beside
    them on a context of its own; killed mid-way and resumed, every id ends up written exactly once."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows_in = [{"id": i, "prompt": f"Story number {i}: once upon a time", "max_tokens": 50, "temperature": 0}
               for i in range(10)]
    rows_in[3].update(policy="snapkv", budget=64)
    rows_in[5].update(policy="h2o", budget=40)
    rows_in[7].update(policy="full")
    rows_in.append({"id": "paris", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0})
    write_jsonl(inp, rows_in)
    kill_batch_after(inp, out, 2, "--parallel", "4")
    first = len(read_jsonl(out))
    res = run("batch", "--input", str(inp), "--output", str(out), *SMALL, "--parallel", "4")
    assert res.returncode == 0, res.stderr
    rows = read_jsonl(out)
    assert sorted(map(str, (r["id"] for r in rows))) == sorted(map(str, (r["id"] for r in rows_in)))
    assert len(rows) == len(rows_in) and first >= 2
    by_id = {r["id"]: r for r in rows}
    assert "Paris" in by_id["paris"]["text"]
    assert (by_id[3]["kv"]["policy"], by_id[3]["kv"]["budget"]) == ("snapkv", 64)
    assert (by_id[5]["kv"]["policy"], by_id[5]["kv"]["budget"]) == ("h2o", 40)
    assert by_id[7]["kv"]["policy"] == "full" and by_id[7]["kv"]["evictions"] == 0
    for r in rows:
        assert r["usage"]["completion_tokens"] >= 1
        if r["kv"]["policy"] != "full":
            assert r["kv"]["max_used_cells"] <= r["kv"]["budget"] + 16
    assert run("batch", "--input", str(inp), "--output", str(tmp_path / "x.jsonl"), *SMALL,
               "--parallel", "0").returncode == 2


def test_batch_ctrl_c_keeps_finished_items(tmp_path, sigint_delivered):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"id": i, "prompt": "Once upon a time", "max_tokens": 60} for i in range(10)])
    proc = subprocess.Popen([*CLI, "batch", "--input", str(inp), "--output", str(out), *SMALL],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same command again to resume" in err
    done = read_jsonl(out)
    assert 2 <= len(done) < 10
