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
    for bad in ("lru", "infokv:alpha", "infokv:beta=1", "snapkv:kernel_size=4"):
        with pytest.raises(ValueError):
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


def test_cli_fidelity_writes_json(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "hubs", "text": haystack_essay("hubs.txt")}) + "\n")
    out = tmp_path / "f.json"
    res = subprocess.run(
        [sys.executable, "-m", "infokv_local", "bench", "fidelity", "--docs", str(docs), "--ratio", "0.25",
         "--max-tokens", "400", "--buffer", "32", "--threads", "1", "--policies", "tova,infokv:alpha=0.95+entropy=at",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["ratio"] == 0.25 and data["n_docs"] == 1
    assert set(data["policies"]) == {"tova", "infokv:alpha=0.95,entropy=at"}
    for s in data["policies"].values():
        assert {"mean_kl", "p95_kl", "top1_agreement", "delta_nll", "n_tokens"} <= set(s)
    assert "mean KL" in res.stdout


def test_markdown_table_orders_by_the_first_run():
    def run(kls):
        return {"ratio": 0.25, "policies": {k: {"mean_kl": v, "p95_kl": 2 * v, "top1_agreement": 0.9,
                                                "delta_nll": 0.01, "n_tokens": 10} for k, v in kls.items()}}

    from infokv_local.bench.fidelity import format_markdown

    md = format_markdown([run({"a": 0.2, "b": 0.1}), run({"a": 0.3, "b": 0.4})]).splitlines()
    assert md[2].startswith("| b | 0.1000") and md[3].startswith("| a | 0.2000")
    assert "0.4000 / 0.8000 / 0.900 / +0.0100" in md[2]


def test_documents_of_either_source_are_written_in_name_order(model, tmp_path):
    from infokv_local.bench.fidelity import make_docs
    from infokv_local.bench.task_data import source_documents

    out = tmp_path / "docs.jsonl"
    n = make_docs(model, out, min_tokens=2048, n=3, source="python-docs")
    docs = read_docs(out)
    assert n == 3 and [d["id"] for d in docs] == sorted(d["id"] for d in docs)
    assert all(d["id"].startswith("pydoc-") and len(model.tokenize(d["text"])) >= 2048 for d in docs)
    essays = source_documents("essays")
    assert len(essays) == 49 and not {d["id"] for d in essays} & {d["id"] for d in docs}
    with pytest.raises(ValueError, match="unknown document source"):
        source_documents("wikipedia")
