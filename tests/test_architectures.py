"""The architecture matrix (docs/architectures.md): a small random-weight model of each architecture, written by
llama.cpp's own test-llama-archs (native/arch_models.py), runs under a budget of 64 cells on the real patched
build: the budget invariant holds on the growing cache at every step, greedy text equals the full cache's
until the first eviction, and a restored snapshot continues exactly. Architectures without a cache of tokens
to bound are refused with the documented reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infokv_local.engine import Engine
from infokv_local.errors import UnsupportedArchitectureError
from infokv_local.model import Model

ROOT = Path(__file__).resolve().parent.parent

# file -> the memory llama.cpp builds for it (the growing part is what the budget bounds)
MATRIX = {
    "llama-dense": "dense", "llama-moe": "dense", "qwen2-dense": "dense", "qwen3-dense": "dense",
    "qwen3moe-moe": "dense", "phi3-dense": "dense", "mistral3-dense": "dense", "mistral3-moe": "dense",
    "smollm3-dense": "dense",
    "glm4-dense": "dense", "deepseek2-moe": "dense",  # MLA: one latent K row per token, still a list of cells
    "exaone4-dense": "dense",  # EXAONE 4 uses its sliding window only with 64 layers
    "gemma2-dense": "sliding-window", "gemma3-dense": "sliding-window", "gpt-oss-moe": "sliding-window",
    "cohere2-dense": "sliding-window", "olmo2-dense": "sliding-window", "llama4-moe": "sliding-window",
    "granitehybrid-dense": "hybrid", "jamba-dense": "hybrid", "falcon-h1-dense": "hybrid",
    "nemotron_h-dense": "hybrid", "qwen35-dense": "hybrid", "qwen3next-moe": "hybrid",
}
# no cache of tokens to bound: refused, with this reason
REFUSED = {
    "mamba2-dense": "it is recurrent",
    "lfm2-dense": "no KV cache this engine can evict",  # with a window, every LFM2 attention layer is sliding
}
BUDGET, BUFFER, N_PROMPT, N_NEW = 64, 16, 40, 300


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("archs")
    subprocess.run([sys.executable, str(ROOT / "native" / "arch_models.py"), "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def test_the_matrix_is_complete(arch_dir):
    assert {p.stem for p in arch_dir.glob("*.gguf")} == set(MATRIX) | set(REFUSED)


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_runs_under_a_budget(arch_dir, name):
    with Model(arch_dir / f"{name}.gguf") as model:
        prompt = np.random.default_rng(0).integers(3, model.info.n_vocab, N_PROMPT).tolist()
        # the models declare a trained context of 256 tokens: positions are not renumbered before 4,096
        with Engine(model, "full", n_threads=2, max_context=512, compact_at=4096) as full:
            want = list(full.generate(prompt, max_tokens=N_NEW, ignore_eos=True))
        with Engine(model, "infokv", budget=BUDGET, buffer=BUFFER, n_threads=2, check_invariants=True,
                    compact_at=4096) as eng:
            assert eng.ctx.memory == MATRIX[name]
            got, first_eviction, most_used = [], None, 0
            for tok in eng.generate(prompt, max_tokens=N_NEW, ignore_eos=True):
                got.append(tok)
                most_used = max(most_used, eng.ctx.n_used)
                if first_eviction is None and eng.totals.evictions:
                    first_eviction = len(got)
            assert len(got) == N_NEW and eng.totals.evictions > 0 and first_eviction is not None
            assert most_used <= BUDGET + BUFFER
            assert got[: first_eviction - 1] == want[: first_eviction - 1]
            parked = eng.snapshot()
            more = list(eng.generate([], max_tokens=20, ignore_eos=True))
        with Engine(model, "infokv", budget=BUDGET, buffer=BUFFER, n_threads=2, compact_at=4096) as other:
            other.restore(parked)
            assert list(other.generate([], max_tokens=20, ignore_eos=True)) == more


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_with_the_reason(arch_dir, name):
    with pytest.raises(UnsupportedArchitectureError, match=REFUSED[name]):
        with Model(arch_dir / f"{name}.gguf") as model, Engine(model, "infokv", budget=BUDGET, n_threads=2):
            pass
