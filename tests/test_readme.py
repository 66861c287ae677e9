"""The README's examples run as written: every code block after a ``<!-- tested -->`` line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"<!-- tested -->\n```(\w+)\n(.*?)\n```", re.S)


def readme_blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(README.read_text())


def test_the_readme_has_readme_blocks():
    kinds = [k for k, _ in readme_blocks()]
    assert kinds.count("python") >= 2 and kinds.count("sh") >= 2


@pytest.mark.parametrize("kind, code", readme_blocks(), ids=lambda v: v.splitlines()[0][:50] if "\n" in v else v)
def test_readme_block_runs(kind, code, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-c", code] if kind == "python" else ["bash", "-euo", "pipefail", "-c", code]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{kind} block failed:\n{code}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
    assert res.stdout.strip()
