"""A tiny real run of the server benchmark: the API and a real server side by side, then park and resume."""

from __future__ import annotations

import json
import subprocess
import sys


def test_server_bench_tiny_run(tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation.server_bench", "--threads", "1", "--max-tokens", "12", "--repeats", "2",
         "--resume-words", "150", "--budget", "64", "--buffer", "16", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert len(r["api_ms_per_token"]) == len(r["server_ms_per_token"]) == len(r["paired_overhead_pct"]) == 2
    assert all(ms > 0 for ms in r["api_ms_per_token"] + r["server_ms_per_token"])
    assert r["tokens_api"] == r["tokens_server"] == 12
    # the parked conversation comes back without prefill; sent as new, its whole history is prefilled
    assert r["resume"]["resumed"]["restored"] is True
    assert r["resume"]["resumed"]["prefilled_tokens"] < 8
    assert r["resume"]["prefilled"]["prefilled_tokens"] >= r["resume"]["history_tokens"]
    assert "server overhead" in proc.stdout


def test_throughput_tiny_run(tmp_path):
    """``evaluation.server_throughput``: rounds of one client alone then N at once against a real
    ``serve --slots N``; every reply is exactly the asked number of tokens (the end of generation banned), so
    the rates compare."""
    out = tmp_path / "throughput.json"
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation.server_throughput", "--slots", "2", "--rounds", "1", "--reply-tokens", "8",
         "--budget", "48", "--buffer", "16", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    (row,) = r["ours"]["rounds"]
    assert (row["one_tokens"], row["all_tokens"]) == (8, 16)
    assert row["one_tok_s"] > 0 and row["all_tok_s"] > 0 and row["ratio"] == row["all_tok_s"] / row["one_tok_s"]
    assert "llama_server" not in r and "2 at once" in proc.stdout
