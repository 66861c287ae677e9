"""The GPU check's parts that run without a GPU: the random-weight model at SmolLM2's shapes, written from a
skeleton that holds no weights, and what the trimmed source leaves behind."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np

from infokv_local.engine import Engine
from infokv_local.llamacpp.model import Model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "native"))

import gpu_check  # noqa: E402


def test_a_random_model_has_the_real_ones_tensors_vocabulary_and_runs(model_path, tmp_path):
    import gguf

    script = str(ROOT / "native" / "random_model.py")
    skeleton, random = tmp_path / "skeleton.gguf", tmp_path / "random.gguf"
    subprocess.run([sys.executable, script, "skeleton", str(model_path), str(skeleton)], check=True)
    assert skeleton.stat().st_size < 4 * 2**20 < model_path.stat().st_size  # it travels; the model does not
    subprocess.run([sys.executable, script, "fill", str(skeleton), str(random)], check=True)
    real, made = gguf.GGUFReader(str(model_path)), gguf.GGUFReader(str(random))
    assert [(t.name, list(t.shape), t.tensor_type) for t in real.tensors] == \
        [(t.name, list(t.shape), t.tensor_type) for t in made.tensors]
    text = "The quick brown fox jumps over the lazy dog."
    with Model(model_path) as a, Model(random) as b:
        assert a.tokenize(text) == b.tokenize(text)
        assert dataclasses.replace(a.info, path=b.info.path) == b.info
        with Engine(b, "infokv", budget=64, buffer=16, check_invariants=True) as eng:
            out = list(eng.generate(b.tokenize(text * 12), 24, ignore_eos=True))
            logits = eng.ctx.logits()
        assert len(out) == 24 and eng.totals.evicted_tokens > 0 and np.isfinite(logits).all()


def test_the_trimmed_source_keeps_what_the_build_reads():
    kept = ["CMakeLists.txt", "llama_cpp/llama.py", "vendor/llama.cpp/src/llama.cpp",
            "vendor/llama.cpp/ggml/src/ggml-cuda/fattn.cu", "vendor/llama.cpp/ggml/src/ggml-cpu/ops.cpp",
            "vendor/llama.cpp/ggml/src/ggml.c", "vendor/llama.cpp/tools/mtmd/clip.cpp",
            "vendor/llama.cpp/common/common.cpp", "vendor/llama.cpp/vendor/nlohmann/json.hpp"]
    dropped = [".git/HEAD", "vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf",
               "vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp", "vendor/llama.cpp/tools/server/server.cpp",
               "vendor/llama.cpp/tests/test-backend-ops.cpp", "vendor/llama.cpp/tools/mtmd/test-3.mp4"]
    assert [n for n in kept if gpu_check._dropped(n)] == []
    assert [n for n in dropped if not gpu_check._dropped(n)] == []
