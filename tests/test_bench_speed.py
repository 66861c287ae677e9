"""``bench speed`` on a tiny real run: stock llama.cpp (the unpatched build) and our engine, the JSON the
issue names, ratios, and a rerun that resumes instead of measuring again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUN_KEYS = {"engine", "policy", "flash_attn", "prompt_tokens", "generated_tokens", "prefill_s", "decode_s",
            "used_cells", "allocated_cells", "peak_rss_bytes"}
ROW_KEYS = {"engine", "policy", "flash_attn", "prompt_tokens", "generated_tokens", "prefill_tok_s", "decode_tok_s",
            "kv_bytes", "peak_rss_bytes", "decode_ratio_vs_stock_best", "prefill_ratio_vs_stock_best"}


def _speed(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, "-m", "infokv_local", "bench", "speed", "--lengths", "96x80",
                        "--policies", "full,infokv", "--budget", "48", "--buffer", "16", "--threads", "1",
                        "--out", str(out), *extra], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, json.loads(out.read_text())


def test_bench_speed_tiny_run_and_resume(tmp_path):
    r, res = _speed(tmp_path)
    assert {"machine", "runs", "rows", "kv_bytes_per_cell"} <= set(res)
    runs = res["runs"]
    assert [(x["engine"], x["policy"], x["flash_attn"]) for x in runs] == [
        ("stock", "full", True), ("stock", "full", False), ("infokv-local", "full", None),
        ("infokv-local", "infokv", None)]
    for x in runs:
        assert RUN_KEYS <= set(x) and x["prefill_s"] > 0 and x["decode_s"] > 0
    ours = {x["policy"]: x for x in runs if x["engine"] == "infokv-local"}
    assert ours["infokv"]["max_used_cells"] <= 48 + 16 < ours["full"]["max_used_cells"]
    assert ours["infokv"]["compressions"] > 0
    for x in ours.values():  # the default on a CPU: the faster setting, timed on this machine
        assert x["flash_attn_used"] in ("on", "off", "split")
        assert x["flash_attn_reason"].startswith(f"{x['flash_attn_used']}: measured on this machine"), \
            x["flash_attn_reason"]
    for row in res["rows"]:
        assert ROW_KEYS <= set(row) and row["decode_tok_s"] > 0 and row["flash_attn_reason"]
    assert "infokv" in r.stdout and "flash attention (FA) of each engine and why:" in r.stdout
    assert "stock full: on: stock llama.cpp is run with each setting" in r.stdout
    again, res2 = _speed(tmp_path)  # every run is in speed.json.runs.jsonl: nothing is measured again
    assert [x["decode_s"] for x in res2["runs"]] == [x["decode_s"] for x in runs]


def test_bench_speed_quantized_cache_and_flash_options(tmp_path):
    _, res = _speed(tmp_path, "--cache-type", "q8_0")
    runs = res["runs"]
    assert [(x["engine"], x["flash_attn"]) for x in runs if x["engine"] == "stock"] == [("stock", True)]
    ours = [x for x in runs if x["engine"] == "infokv-local"]
    assert sorted((x["policy"], x["flash_attn_used"]) for x in ours) == [("full", "on"), ("infokv", "on")]
    bad = subprocess.run([sys.executable, "-m", "infokv_local", "bench", "speed", "--cache-type", "q8_0",
                          "--flash-attn", "both", "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "needs flash attention" in bad.stderr
    _, both = _speed(tmp_path / "fa", "--flash-attn", "both", "--policies", "infokv")
    assert sorted(x["flash_attn_used"] for x in both["runs"] if x["engine"] == "infokv-local") == ["off", "on"]
    assert res["cache_type"] == "q8_0" and res["kv_bytes_per_cell"] * 64 % 34 == 0


def test_bench_speed_reports_both_parts_of_a_sliding_window_memory(tmp_path, gemma_path):
    _, res = _speed(tmp_path, "--model", str(gemma_path), "--stock-flash-attn", "off", "--flash-attn", "off")
    stock = next(x for x in res["runs"] if x["engine"] == "stock")
    ours = next(x for x in res["runs"] if x["policy"] == "infokv")
    # stock's sizes come from llama.cpp's own log of the caches it creates (to 0.01 MiB)
    assert stock["bounded_bytes"] > 0
    assert abs(stock["growing_bytes_allocated"] - stock["allocated_cells"] * res["kv_bytes_per_cell"]) <= 0.01 * 2**20
    assert ours["growing_bytes_allocated"] == ours["allocated_cells"] * ours["growing_bytes_per_cell"]
    # llama.cpp sizes the sliding-window cache from the context, so ours allocates at least the window and a
    # batch (576 cells here, more than this tiny run's stock context): the budget bounds the cells in use
    assert 0 < ours["bounded_bytes"] and ours["max_used_cells"] <= 48 + 16 < stock["used_cells"]
    for row in res["rows"]:
        assert row["kv_bytes"] == row["growing_bytes"] + row["bounded_bytes"] > row["bounded_bytes"] > 0
        assert row["kv_bytes_allocated"] == row["growing_bytes_allocated"] + row["bounded_bytes"]


def test_bench_overhead_tiny_run(tmp_path):
    """``bench overhead``: stock, patched with statistics off and on, and our context, on the plain decode loop."""
    out = tmp_path / "overhead.json"
    r = subprocess.run([sys.executable, "-m", "infokv_local", "bench", "overhead", "--rounds", "1", "--prompt", "64",
                        "--gen", "8", "--inner", "1", "--threads", "1", "--batch", "64", "--n-ctx", "256", "--json",
                        str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["median"]) == {"stock", "patched_off", "patched_on", "signals"}
    for figures in res["median"].values():
        assert all(v > 0 for v in figures.values())
    assert "patched_on/stock" in res["ratios"]


def test_speed_plan_interleaves_and_leaves_out_h2o_with_flash_attention():
    from infokv_local.bench.speed import plan

    runs = plan([(64, 32), (128, 32)], ["full", "infokv", "h2o"], rounds=2, base={"threads": 2},
                ours_flash=(True, False))
    keys = [(r["round"], r["prompt_tokens"], r["engine"], r["policy"], r["flash_attn"]) for r in runs]
    per_length = [("stock", "full", True), ("stock", "full", False), ("infokv-local", "full", True),
                  ("infokv-local", "infokv", True), ("infokv-local", "full", False),
                  ("infokv-local", "infokv", False), ("infokv-local", "h2o", False)]
    assert keys == [(r, p, *k) for r in (0, 1) for p in (64, 128) for k in per_length]
    quantized = plan([(64, 32)], ["infokv"], 1, {"cache_type": "q8_0"}, (True,))
    assert [(r["engine"], r["flash_attn"]) for r in quantized] == [("stock", True), ("infokv-local", True)]


def test_speed_plan_runs_stock_only_at_the_asked_flash_attention_setting():
    from infokv_local.bench.speed import plan

    runs = plan([(64, 32)], ["infokv"], 1, {"threads": 1}, (False,), stock_flash=(False,))
    assert [(r["engine"], r["flash_attn"]) for r in runs] == [("stock", False), ("infokv-local", False)]


def test_speed_plan_and_summary_with_the_prompt_probe_both_ways():
    from infokv_local.bench.speed import _run_key, plan, summarize

    runs = plan([(64, 32)], ["full", "infokv"], 1, {"threads": 1}, (False,), stock_flash=(False,),
                ours_probe=(False, True))
    assert [(r["engine"], r["policy"], r.get("prompt_probe", False)) for r in runs] == [
        ("stock", "full", False), ("infokv-local", "full", False), ("infokv-local", "infokv", False),
        ("infokv-local", "infokv", True)]  # the full cache compresses nothing: no probed run of it
    assert len({_run_key({**r, "budget": 48, "buffer": 16}) for r in runs}) == 4
    measured = [{**r, "budget": 48, "buffer": 16, "prefill_s": 1.0, "decode_s": 1.0, "decode_steps": 31,
                 "used_cells": 64, "allocated_cells": 128, "peak_rss_bytes": 1, "timeline": []} for r in runs]
    rows = summarize(measured, kv_bytes_per_cell=10)
    assert sorted(r["policy"] for r in rows if r["engine"] == "infokv-local") == ["full", "infokv", "infokv+probe"]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker ends with its parent on Linux")
def test_a_killed_benchmark_takes_its_worker_with_it(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "infokv_local", "bench", "speed", "--lengths", "96x100000",
                             "--policies", "full", "--stock-flash-attn", "off", "--threads", "1",
                             "--out", str(tmp_path / "k.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    workers: list[int] = []
    while time.monotonic() < deadline and not workers:
        workers = _children(proc.pid)
        time.sleep(0.2)
    assert workers, "no worker started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_running(w) for w in workers):
        time.sleep(0.2)
    assert not any(_running(w) for w in workers)


def _running(pid: int) -> bool:
    """Whether the process exists and has not ended (a zombie waits for its new parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
