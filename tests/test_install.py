"""Installing into an environment of one's own, as docs/install.md says: ``pip install`` of the package (not
editable), then ``python -m infokv_local install`` (the patched llama.cpp, reused from the wheel cache that
the set-up filled, and the kernels), then a generation with the real model. Before the second step the
parts without llama.cpp already import."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*cmd: object, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    # never in the checkout: python -m and -c put the working directory first on the path
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert res.returncode == 0, f"{cmd}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_pip_install_then_the_install_command(tmp_path, model_path):
    run = functools.partial(_run, cwd=tmp_path)
    # a copy of what the package is made of, so the build leaves nothing in the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("infokv_local", "evaluation"):  # the research folder too: the wheel must leave it out
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "_kernels*", ".kernels.key"))
    env = tmp_path / "env"
    run(sys.executable, "-m", "venv", env)
    py = env / "bin" / "python"
    run(py, "-m", "pip", "install", "--quiet", src)
    # without llama.cpp: the policies, the settings and the command line's help
    run(py, "-c", "from infokv_local.policies import make_policy; from infokv_local.settings import DEFAULTS; "
                   "assert make_policy(DEFAULTS.policy).evicts")
    assert "install" in run(py, "-m", "infokv_local", "--help").stdout
    # the API says how to build the library; no research code was installed
    out = run(py, "-c", "import infokv_local\ntry:\n    infokv_local.InfoKVLlama\n"
                        "except infokv_local.UnpatchedLibraryError as e:\n    print(e)").stdout
    assert "python -m infokv_local install" in out
    res = subprocess.run([py, "-m", "infokv_local", "generate", "hi"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and "python -m infokv_local install" in res.stderr, res.stderr
    installed = run(py, "-m", "pip", "show", "--files", "infokv-local").stdout
    assert "infokv_local/api/llama.py" in installed
    assert "evaluation" not in installed and "task_data" not in installed, installed
    out = run(py, "-m", "infokv_local", "install").stdout
    assert "installed patched llama-cpp-python" in out and "built infokv_local._kernels" in out
    site = Path(run(py, "-c", "import infokv_local, pathlib; print(pathlib.Path(infokv_local.__file__).parent)")
                .stdout.strip())
    assert site.is_relative_to(env) and list(site.glob("_kernels*.so"))
    res = run(py, "-m", "infokv_local", "generate", "Name a colour.", "--model", model_path, "--max-tokens", "8",
               "--budget", "64", "--buffer", "16", "--threads", "2")
    assert res.stdout.strip()
    assert "already installed" in run(py, "-m", "infokv_local", "install").stdout  # a second run is quick
