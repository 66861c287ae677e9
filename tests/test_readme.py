"""The examples of the README and of docs/ run as written, and print or do what they say: every code block
after a ``<!-- tested -->`` line has a check in :data:`CHECKS`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- tested -->\n```(\w+)\n(.*?)\n```", re.S)


def readme_blocks() -> list[tuple[str, str]]:
    return [block for page in PAGES for block in BLOCK.findall(page.read_text())]


def test_the_readme_and_the_docs_have_tested_blocks():
    assert BLOCK.findall(README.read_text())
    kinds = [k for k, _ in readme_blocks()]
    assert kinds.count("python") >= 3 and kinds.count("sh") >= 2


def test_the_pages_for_readers_name_no_issue():
    """The user docs, the results page, the research folder's README and the changelog say what is true now; the
    dated notes in benchmarks/notes/ keep the history. (Their links: tests/test_doc_links.py.)"""
    for page in [*PAGES, ROOT / "BENCHMARKS.md", ROOT / "evaluation" / "README.md", ROOT / "CHANGELOG.md"]:
        assert not re.search(r"\bissues? #?\d+", page.read_text(), re.I), page


def test_the_readme_is_short():
    assert len(README.read_text().encode()) <= 12_500


def _api(out: str, err: str, cwd: Path) -> None:
    nums = [line for line in out.splitlines() if re.fullmatch(r"\d+ \d+ \d+ \d+", line)]
    assert len(nums) == 1, out
    used, peak, evicted, kv_bytes = map(int, nums[0].split())
    assert 0 < used <= peak <= 128 + 32 and evicted > 0 and kv_bytes % used == 0  # 200 tokens under 128 + 32
    reused = re.search(r"^history reused: (\d+) tokens$", out, re.M)
    assert reused and int(reused.group(1)) > 0, out  # the second turn reuses the compressed cache
    assert len(out) > 300  # the story


def _commands(out: str, err: str, cwd: Path) -> None:
    lines = [json.loads(line) for line in out.splitlines() if line.startswith('{"text"')]
    assert len(lines) == 1, out
    j = lines[0]
    assert j["kv"]["policy"] == "h2o" and j["kv"]["budget"] == 64 and j["kv"]["max_used_cells"] <= 80
    assert j["usage"]["completion_tokens"] == 100 and j["kv"]["evicted_tokens"] > 0 and j["text"]
    assert err.count("tokens evicted in") >= 2  # generate's cache summary, chat's per turn
    assert re.search(r"^default \(embedded\): .*\.gguf$", out, re.M)  # models
    assert "qwen2.5-coder-1.5b" in out and "qwen2.5-coder-0.5b" in out


def _batch(out: str, err: str, cwd: Path) -> None:
    rows = [json.loads(line) for line in (cwd / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["fr", "h2o-story", "story"]  # each once: the rerun added nothing
    by_id = {r["id"]: r for r in rows}
    assert "Paris" in by_id["fr"]["text"] and by_id["story"]["usage"]["completion_tokens"] <= 150
    assert by_id["h2o-story"]["kv"]["policy"] == "h2o" and all(r["kv"]["max_used_cells"] <= 80 for r in rows)
    assert "3 items, 3 already in results.jsonl, 0 to do" in err
    assert out.splitlines()[0].startswith('{"id": ')


def _readme_api(out: str, err: str, cwd: Path) -> None:
    found = re.search(r"^cells (\d+) of (\d+) evicted (\d+)$", out, re.M)
    assert found, out
    peak, capacity, evicted = map(int, found.groups())
    assert capacity == 128 + 32 and 0 < peak <= capacity and evicted > 0, out  # 300 tokens under 128 + 32
    assert len(out) > 300  # the story


def _engine(out: str, err: str, cwd: Path) -> None:
    assert out.strip() == "160 160"  # as the block's comment says: peak = budget + buffer


def _signals(out: str, err: str, cwd: Path) -> None:
    assert out.strip() == "(30, 10) (30, 1024) 8"  # as the block's comment says


# what each tested block must print or leave behind, found by a line of its code
CHECKS: dict[str, Callable[[str, str, Path], None]] = {
    'out = llm.create_chat_completion(messages, max_tokens=200': _api,
    "Tell me a long story about a fox.": _readme_api,
    "python -m infokv_local models": _commands,
    "python -m infokv_local batch --input prompts.jsonl": _batch,
    'with Engine(model, "infokv", budget=128': _engine,
    "sig = ctx.decode(tokens, start_pos=0)": _signals,
}


def _check_of(code: str) -> Callable[[str, str, Path], None]:
    found = [f for key, f in CHECKS.items() if key in code]
    assert len(found) == 1, f"every tested block needs exactly one check in CHECKS:\n{code}"
    return found[0]


def test_every_tested_block_has_a_check():
    for _, code in readme_blocks():
        _check_of(code)


@pytest.mark.parametrize("kind, code", readme_blocks(), ids=lambda v: v.splitlines()[0][:50] if "\n" in v else v)
def test_readme_block_runs(kind, code, tmp_path):
    check = _check_of(code)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-c", code] if kind == "python" else ["bash", "-euo", "pipefail", "-c", code]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{kind} block failed:\n{code}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
    assert res.stdout.strip()
    check(res.stdout, res.stderr, tmp_path)


def _section(page: Path, title: str) -> str:
    text = page.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_the_readme_server_section_runs_as_written(tmp_path):
    """The README's server lines: its `serve` command started as written (port 8000), its curl request, then its
    `openai` client block with a print of the reply added."""
    import socket
    import time
    import urllib.request

    blocks = re.findall(r"```(\w+)\n(.*?)\n```", _section(README, "Server"), re.S)
    (sh,) = [code for kind, code in blocks if kind == "sh"]
    (client,) = [code for kind, code in blocks if kind == "python"]
    serve, curl = sh.split("\n", 1)
    assert serve.startswith("python -m infokv_local serve") and curl.startswith("curl ")
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("port 8000 (the README's) is taken on this machine")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(["bash", "-c", f"exec {serve}"], cwd=tmp_path, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", curl], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        reply = json.loads(res.stdout)
        assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] <= 32
        assert reply["usage"]["kv"]["max_used_cells"] <= 1024 + 128
        code = client + "\nprint(repr(r.choices[0].message.content), r.usage.completion_tokens)"
        res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        text, tokens = res.stdout.strip().rsplit(" ", 1)
        assert text not in ("''", "None") and 0 < int(tokens) <= 32
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
