"""The fidelity benchmark on the real model (small), and its input checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from infokv_local.bench.fidelity import read_docs, run_fidelity
from infokv_local.policies import InfoKVPolicy, SnapKVPolicy, make_policy

from .conftest import haystack_essay


def test_policy_specs():
    p = make_policy("infokv:alpha=0.95,entropy=at,top_k=64")
    assert isinstance(p, InfoKVPolicy) and (p.alpha, p.entropy, p.top_k) == (0.95, "at", 64)
    assert isinstance(make_policy("snapkv"), SnapKVPolicy)
    for bad, message in (("lru", "unknown policy 'lru'"), ("infokv:alpha", "expected key=value"),
                         ("infokv:beta=1", "unexpected keyword argument 'beta'"),
                         ("snapkv:kernel_size=4", "kernel_size must be a positive odd number")):
        with pytest.raises(ValueError, match=message):
            make_policy(bad)


def test_read_docs_reports_the_bad_line(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"id": "a", "text": "hello"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_docs(f)
    f.write_text('{"id": "a", "text": "hello"}\nnot json\n')
    with pytest.raises(ValueError, match=":2: not valid JSON"):
        read_docs(f)


def test_fidelity_on_one_document(model):
    docs = [{"id": "gba", "text": haystack_essay("gba.txt")}]
    res = run_fidelity(model, docs, ["streaming", "snapkv", "infokv", "random"], budget=128, buffer=32,
                       max_tokens=600, progress=False)
    assert res["n_docs"] == 1 and res["budget"] == 128
    for name in ("streaming", "snapkv", "infokv", "random"):
        s = res["policies"][name]
        # evictions start once 128 + 32 cells are full, chunks are 32 tokens, the last token has no target
        assert s["n_tokens"] == 600 - 160 - 1
        assert 0 <= s["mean_kl"] <= s["p95_kl"] * 10
        assert 0.3 < s["top1_agreement"] <= 1
        assert s["delta_nll"] > -0.5
    # the same tokens, the same budget: InfoKV must keep the distribution closer to the full cache's than
    # random eviction (seeded, so the comparison is fixed), or the policy is broken
    pol = res["policies"]
    assert pol["infokv"]["mean_kl"] < pol["random"]["mean_kl"]
    assert pol["infokv"]["top1_agreement"] >= pol["random"]["top1_agreement"]


def test_fidelity_with_a_quantized_cache(model):
    """q8_0 K and V for the evicting policies against the f16 full cache, and the q8_0 full cache alone over
    every token: quantization costs far less than eviction, and eviction on top of it costs more."""
    docs = [{"id": "gba", "text": haystack_essay("gba.txt")}]
    res = run_fidelity(model, docs, ["infokv"], budget=128, buffer=32, max_tokens=400, progress=False,
                       cache_type="q8_0")
    pol = res["policies"]
    assert res["cache_type"] == "q8_0" and set(pol) == {"infokv", "full@q8_0"}
    assert pol["full@q8_0"]["n_tokens"] == 400 - 1 and pol["infokv"]["n_tokens"] == 400 - 160 - 1
    assert 0 < pol["full@q8_0"]["mean_kl"] < pol["infokv"]["mean_kl"]
    with pytest.raises(ValueError, match="not a KV-cache type"):
        run_fidelity(model, docs, ["infokv"], budget=128, cache_type="q9")


def test_cli_fidelity_two_ratios_resumes_from_its_log(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "hubs", "text": haystack_essay("hubs.txt")}) + "\n")
    out = tmp_path / "f.json"
    cmd = [sys.executable, "-m", "infokv_local", "bench", "fidelity", "--docs", str(docs), "--ratio", "0.25,0.125",
           "--max-tokens", "400", "--buffer", "32", "--threads", "1", "--no-progress",
           "--policies", "tova,infokv:alpha=0.95+entropy=at", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert [r["ratio"] for r in data["runs"]] == [0.25, 0.125]
    for run in data["runs"]:
        assert run["n_docs"] == 1 and set(run["policies"]) == {"tova", "infokv:alpha=0.95,entropy=at"}
        for s in run["policies"].values():
            assert {"mean_kl", "p95_kl", "top1_agreement", "delta_nll", "n_tokens"} <= set(s)
        (ratio,) = [r for r in run["kl_ratios"] if r["against"] == "baselines"]
        assert ratio["best_baseline"] == "tova" and ratio["n_items"] == 1
    assert "mean KL" in res.stdout and "paired by document" in res.stdout
    log = out.with_suffix(".jsonl")
    assert len(log.read_text().splitlines()) == 4  # one document x two policies x two budgets

    # a rerun measures nothing again and reports the same
    res2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res2.returncode == 0, res2.stderr
    assert len(log.read_text().splitlines()) == 4
    again = json.loads(out.read_text())
    for a, b in zip(data["runs"], again["runs"], strict=True):
        for name in a["policies"]:
            assert b["policies"][name]["mean_kl"] == pytest.approx(a["policies"][name]["mean_kl"], abs=1e-6)
            assert b["policies"][name]["decode_s"] == a["policies"][name]["decode_s"]  # read back, not re-run
    table = subprocess.run([sys.executable, "-m", "infokv_local", "bench", "table", str(out)], capture_output=True,
                           text=True, timeout=120)
    assert table.returncode == 0 and "25.0% budget" in table.stdout and "12.5% budget" in table.stdout


def test_fidelity_log_measures_only_what_is_missing(model, tmp_path):
    docs = [{"id": "gba", "text": haystack_essay("gba.txt")}]
    log = tmp_path / "f.jsonl"
    first = run_fidelity(model, docs, ["snapkv", "infokv"], budget=128, buffer=32, max_tokens=400, progress=False,
                         log=log)
    assert len(log.read_text().splitlines()) == 2
    with log.open("a") as fh:
        fh.write('{"item_id": "gba", "pol')  # a kill in the middle of a line
    second = run_fidelity(model, docs, ["snapkv", "infokv", "tova"], budget=128, buffer=32, max_tokens=400,
                          progress=False, log=log)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["policy"] for x in lines] == ["snapkv", "infokv", "tova"]  # the torn line dropped, tova added
    assert (first["resumed_records"], second["resumed_records"]) == (0, 2)
    for name in ("snapkv", "infokv"):
        a, b = first["policies"][name], second["policies"][name]
        assert b["mean_kl"] == pytest.approx(a["mean_kl"], abs=1e-6) and b["n_tokens"] == a["n_tokens"]
        assert b["score_s"] == a["score_s"]
    (ratio,) = [r for r in second["kl_ratios"] if r["against"] == "baselines"]
    assert ratio["policy"] == "infokv" and {"snapkv", "tova", "best"} <= set(ratio)
    assert ratio["snapkv"]["ratio"] == pytest.approx(second["policies"]["infokv"]["mean_kl"]
                                                      / second["policies"]["snapkv"]["mean_kl"], rel=1e-4)
    with pytest.raises(ValueError, match="other settings .*buffer 32 there, 64 now"):
        run_fidelity(model, docs, ["snapkv"], budget=128, buffer=64, max_tokens=400, progress=False, log=log)


def test_markdown_table_orders_by_the_first_run():
    def run(kls):
        return {"ratio": 0.25, "policies": {k: {"mean_kl": v, "p95_kl": 2 * v, "top1_agreement": 0.9,
                                                "delta_nll": 0.01, "n_tokens": 10} for k, v in kls.items()}}

    from infokv_local.bench.fidelity import format_markdown

    md = format_markdown([run({"a": 0.2, "b": 0.1}), run({"a": 0.3, "b": 0.4})]).splitlines()
    assert md[2].startswith("| b | 0.1000") and md[3].startswith("| a | 0.2000")
    assert "0.4000 / 0.8000 / 0.900 / +0.0100" in md[2]


def test_documents_of_either_source_are_written_in_name_order(model, tmp_path):
    from infokv_local.bench.documents import source_documents
    from infokv_local.bench.fidelity import make_docs

    out = tmp_path / "docs.jsonl"
    n = make_docs(model, out, min_tokens=2048, n=3, source="python-docs")
    docs = read_docs(out)
    assert n == 3 and [d["id"] for d in docs] == sorted(d["id"] for d in docs)
    assert all(d["id"].startswith("pydoc-") and len(model.tokenize(d["text"])) >= 2048 for d in docs)
    essays = source_documents("essays")
    assert len(essays) == 49 and not {d["id"] for d in essays} & {d["id"] for d in docs}
    with pytest.raises(ValueError, match="unknown document source"):
        source_documents("wikipedia")


def test_cli_fidelity_quick_reads_the_offline_essays_without_a_docs_file(tmp_path):
    res = subprocess.run([sys.executable, "-m", "infokv_local", "bench", "fidelity", "--quick", "--max-docs", "1",
                          "--threads", "1", "--no-progress"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "1 docs, ratio 0.25" in res.stdout
    rows = {line.split()[0] for line in res.stdout.splitlines()[2:5]}
    assert rows == {"infokv", "snapkv", "h2o"}
    assert list(tmp_path.iterdir()) == []  # nothing written without --json
    res = subprocess.run([sys.executable, "-m", "infokv_local", "bench", "fidelity", "--max-docs", "1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "give --budget or --ratio" in res.stderr
