"""The architecture matrix (docs/architectures.md): a small random-weight model of each architecture, written by
llama.cpp's own test-llama-archs (native/arch_models.py), runs under a budget of 64 cells on the real patched
build: the budget invariant holds on the growing cache at every step, greedy text equals the full cache's
until the first eviction, and a restored snapshot continues exactly. Architectures whose memory does not grow
with the sequence (recurrent) run without eviction and say so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infokv_local.engine import Engine
from infokv_local.errors import UnsupportedArchitectureError
from infokv_local.llamacpp.model import Model

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
# nothing grows with the sequence: they run without eviction, and say so
NOTHING_GROWS = {
    "mamba2-dense": "recurrent",
    "lfm2-dense": "hybrid",  # with a window, every LFM2 attention layer is sliding
}
BUDGET, BUFFER, N_PROMPT, N_NEW = 64, 16, 40, 300
# past the budget + buffer and the sliding-window cache (256 cells here), which renumbering keeps whole
N_LONG, COMPACT_AT = 600, 450


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("archs")
    subprocess.run([sys.executable, str(ROOT / "native" / "arch_models.py"), "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def test_the_matrix_is_complete(arch_dir):
    assert {p.stem for p in arch_dir.glob("*.gguf")} == set(MATRIX) | set(NOTHING_GROWS)


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


@pytest.mark.parametrize("name", sorted(NOTHING_GROWS))
def test_runs_without_eviction_when_nothing_grows(arch_dir, name):
    with Model(arch_dir / f"{name}.gguf") as model:
        prompt = np.random.default_rng(0).integers(3, model.info.n_vocab, N_PROMPT).tolist()
        with Engine(model, "full", n_threads=2, max_context=512) as full:
            want = list(full.generate(prompt, max_tokens=N_NEW, ignore_eos=True))
        with Engine(model, "infokv", budget=BUDGET, buffer=BUFFER, n_threads=2, max_context=512,
                    check_invariants=True) as eng:
            assert eng.ctx.memory == NOTHING_GROWS[name] and not eng.ctx.grows
            assert eng.policy.name == "full" and "nothing to evict" in (eng.eviction_note or "")
            assert eng.kv_bytes_per_cell == 0 and eng.ctx.bounded_bytes > 0
            got = list(eng.generate(prompt, max_tokens=N_NEW, ignore_eos=True))
            assert got == want and eng.totals.evictions == 0
            parked = eng.snapshot()
            more = list(eng.generate([], max_tokens=20, ignore_eos=True))
        with Engine(model, "infokv", budget=BUDGET, buffer=BUFFER, n_threads=2, max_context=512) as other:
            other.restore(parked)
            assert list(other.generate([], max_tokens=20, ignore_eos=True)) == more


def test_the_command_line_says_once_that_eviction_has_nothing_to_do(arch_dir):
    res = subprocess.run([sys.executable, "-m", "infokv_local", "generate", "Hello", "--model",
                          str(arch_dir / "mamba2-dense.gguf"), "--max-tokens", "8", "--budget", "64", "--buffer", "16",
                          "--threads", "2"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("nothing to evict") == 1 and "recurrent memory" in res.stderr


# positions renumbered before they pass compact_at: every memory with a growing part shifts both of its parts,
# except where llama.cpp cannot shift positions at all (several positions per embedding: M-RoPE) and chunked
# attention (a shift would move tokens across its chunks)
CANNOT_SHIFT = {"qwen35-dense": "cannot shift positions", "llama4-moe": "chunked attention"}


@pytest.mark.parametrize("name", sorted(n for n, kind in MATRIX.items() if kind != "dense") + ["llama-dense"])
def test_positions_are_renumbered_on_every_memory(arch_dir, name):
    with Model(arch_dir / f"{name}.gguf") as model:
        prompt = np.random.default_rng(1).integers(3, model.info.n_vocab, N_PROMPT).tolist()
        if name in CANNOT_SHIFT:
            with Engine(model, "infokv", budget=BUDGET, buffer=BUFFER, n_threads=2, compact_at=4096) as eng:
                list(eng.generate(prompt, max_tokens=8, ignore_eos=True))
                with pytest.raises(UnsupportedArchitectureError, match=CANNOT_SHIFT[name]):
                    eng.ctx.compact_positions()
            return
        with Engine(model, "infokv", budget=BUDGET, buffer=BUFFER, n_threads=2, check_invariants=True,
                    compact_at=COMPACT_AT) as eng:
            got = list(eng.generate(prompt, max_tokens=N_LONG, ignore_eos=True))
            assert len(got) == N_LONG and eng.compactions >= 1 and eng.n_past <= COMPACT_AT
            assert eng.ctx.cell_map()[1][-1] == eng.n_past - 1


@pytest.mark.parametrize("name", ["llama-dense", "gemma3-dense", "qwen35-dense", "granitehybrid-dense"])
def test_sequences_share_a_context_on_every_memory(arch_dir, name):
    """Two engines on one SharedContext (a stream each on the dense memory, one unified cache on the
    sliding-window and hybrid ones), decoded together: the budget invariant per sequence, and each greedy
    text the lone run's until a step where the lone run's two best logits were within 0.05 (llama.cpp is not
    batch-invariant; random weights give flat logits, so such steps are common, and the texts part at one
    now and then)."""
    import threading

    from infokv_local.engine import SharedContext

    kw = dict(budget=BUDGET, buffer=BUFFER, n_threads=2, check_invariants=True, compact_at=4096, flash_attn=False)
    with Model(arch_dir / f"{name}.gguf") as model:
        rng = np.random.default_rng(1)
        prompts = [rng.integers(3, model.info.n_vocab, N_PROMPT + 20 * i).tolist() for i in range(2)]
        alone = []
        for p in prompts:
            with Engine(model, "infokv", **kw) as e:
                toks, gaps = [], []
                for t in e.generate(p, max_tokens=120, ignore_eos=True):
                    top = np.sort(e.ctx.logits(-1))[-2:]
                    toks.append(t)
                    gaps.append(top[1] - top[0])  # of the logits that chose the next token
                alone.append((toks, gaps))
        with SharedContext.for_policies(model, 2, ["infokv"], capacity=BUDGET + BUFFER, n_threads=2,
                                        flash_attn=False) as shared:
            assert shared.streams == (MATRIX[name] == "dense")
            out: list = [None, None]

            def work(i):
                with Engine(model, "infokv", shared=shared, **kw) as e:
                    out[i] = (list(e.generate(prompts[i], max_tokens=120, ignore_eos=True)), e.totals)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert shared.batched_tokens > shared.batches
        for (want, gaps), (got, totals) in zip(alone, out, strict=True):
            assert totals.evictions > 0 and totals.max_used_cells <= BUDGET + BUFFER
            part = next((j for j in range(len(want)) if got[j] != want[j]), None)
            # token j came from the logits after token j - 1 (the first from the prompt's: no gap recorded)
            assert part is None or (part > 0 and gaps[part - 1] < 0.05), f"parted at {part} with no near tie"
