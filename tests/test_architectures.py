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


@pytest.mark.parametrize("name", ["llama-dense", "gemma3-dense", "gpt-oss-moe", "granitehybrid-dense", "qwen35-dense"])
def test_a_prompt_forked_to_another_policy_goes_on_as_its_own_reading(arch_dir, name):
    """A prompt read by SnapKV and forked to TOVA (the same signals recorded) holds what TOVA's own reading would:
    the same greedy text under eviction, on a dense, a sliding-window and a hybrid memory."""
    kw = dict(budget=BUDGET, buffer=BUFFER, n_threads=2, check_invariants=True, compact_at=4096)
    with Model(arch_dir / f"{name}.gguf") as model:
        prompt = np.random.default_rng(1).integers(3, model.info.n_vocab, N_PROMPT).tolist()
        with Engine(model, "snapkv", **kw) as reader:
            reader.prefill(prompt)
            read = reader.snapshot()
        with Engine(model, "tova", **kw) as forked, Engine(model, "tova", **kw) as own:
            forked.fork(read)
            own.prefill(prompt)
            got = list(forked.generate([], max_tokens=120, ignore_eos=True))
            want = list(own.generate([], max_tokens=120, ignore_eos=True))
            assert forked.totals.evictions > 0 and got == want


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


# memories that cannot drop their newest tokens (a sliding-window cache past its window, a recurrent state):
# checkpoints of the bounded part where each prompt starts and before its last token (docs/memory.md)
ROLLBACK = ["gemma3-dense", "granitehybrid-dense", "mamba2-dense", "qwen35-dense"]


def _turn(eng: Engine, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Read ``prompt`` and generate ``n`` tokens greedily: the tokens and the logits the first was chosen from
    (random weights loop over a few tokens, so the logits are what tells two states apart)."""
    gen = eng.generate(prompt, max_tokens=n, ignore_eos=True)
    first = next(gen)
    logits = eng.ctx.logits(-1).copy()
    return [first, *gen], logits


def _two_turns(eng: Engine, p1: list[int], p2: list[int]) -> tuple[list[int], list[int]]:
    return _turn(eng, p1, 40)[0], _turn(eng, p2, 20)[0]


@pytest.mark.parametrize("name", ROLLBACK)
def test_an_edited_or_regenerated_turn_goes_back_to_a_checkpoint(arch_dir, name):
    """Full cache: going back to before the last turn's last token, or to the start of the last turn, gives
    exactly the logits of an engine that read the conversation that way from the start; a point with no
    checkpoint is refused, changing nothing."""
    kw = dict(n_threads=2, max_context=512, compact_at=4096, flash_attn=False)
    with Model(arch_dir / f"{name}.gguf") as model:
        rng = np.random.default_rng(2)
        p1, p2, edited = (rng.integers(3, model.info.n_vocab, n).tolist() for n in (50, 30, 24))
        with Engine(model, "full", **kw) as ref:
            r1 = _turn(ref, p1, 40)[0]
            r2, logits2 = _turn(ref, p2, 20)
            ref.reset()
            assert _turn(ref, p1, 40)[0] == r1
            want_edit, want_logits = _turn(ref, edited, 20)
        assert not np.array_equal(logits2, want_logits)
        with Engine(model, "full", **kw) as eng:
            assert _two_turns(eng, p1, p2) == (r1, r2)
            turn2 = len(p1) + len(r1)  # the first answer's last token is decoded when the second turn starts
            assert eng.checkpoint_points() == [len(p1) - 1, turn2, turn2 + len(p2) - 1]
            assert len(eng.checkpoints) == 3 and eng.checkpoints.nbytes > 0
            if eng.ctx.memory != "sliding-window":  # within its window a sliding-window cache drops tokens itself
                before = (list(eng.tokens), eng.n_past, eng.cached_positions().tolist())
                assert not eng.can_truncate(20) and not eng.truncate(20)
                assert (eng.tokens, eng.n_past, eng.cached_positions().tolist()) == before
            # regenerate: back to before the second prompt's last token, which is read again
            assert eng.truncate(turn2 + len(p2) - 1) and eng.n_past == turn2 + len(p2) - 1
            got, logits = _turn(eng, p2[-1:], 20)
            assert got == r2
            np.testing.assert_array_equal(logits, logits2)
            # edit: back to where the second prompt started; the later checkpoint goes with the dropped turn
            assert eng.truncate(turn2) and eng.checkpoint_points() == [len(p1) - 1, turn2]
            got, logits = _turn(eng, edited, 20)
            assert got == want_edit
            np.testing.assert_array_equal(logits, want_logits)


@pytest.mark.parametrize("name", ["granitehybrid-dense", "qwen35-dense"])
def test_going_back_under_eviction_keeps_the_budget(arch_dir, name):
    """Under a budget of 64 a hybrid keeps the token before each checkpoint (llama.cpp goes on after the
    newest position both parts hold), so every checkpoint stays usable; the invariant holds throughout."""
    kw = dict(budget=BUDGET, buffer=BUFFER, n_threads=2, check_invariants=True, compact_at=4096, flash_attn=False)
    with Model(arch_dir / f"{name}.gguf") as model:
        rng = np.random.default_rng(3)
        p1, p2 = (rng.integers(3, model.info.n_vocab, n).tolist() for n in (80, 30))
        with Engine(model, "infokv", **kw) as eng:
            _two_turns(eng, p1, p2)
            more = list(eng.generate([], max_tokens=120, ignore_eos=True))  # long past both turns' tokens
            assert len(more) == 120 and eng.totals.evictions > 0
            points = eng.checkpoint_points()
            assert len(points) == 3 and set(points) == set(eng.checkpoints.points())
            assert set(eng.checkpoint_anchors()) <= set(eng.cached_positions().tolist())
            for n in reversed(points):
                assert eng.truncate(n) and len(eng.tokens) == n
                out = list(eng.generate(rng.integers(3, model.info.n_vocab, 8).tolist(), max_tokens=30,
                                        ignore_eos=True))
                assert len(out) == 30 and eng.totals.max_used_cells <= BUDGET + BUFFER


@pytest.mark.parametrize("name", ["granitehybrid-dense", "mamba2-dense"])
def test_the_api_keeps_the_conversation_before_an_edited_turn(arch_dir, name):
    """Through InfoKVLlama: a regenerated or edited last turn keeps everything before it (it used to read the
    whole conversation again on these memories); the kv block counts the checkpoints."""
    from infokv_local import InfoKVLlama

    with Model(arch_dir / f"{name}.gguf") as model, \
            InfoKVLlama(model, policy="infokv", budget=BUDGET, buffer=BUFFER, n_threads=2, flash_attn=False) as llm:
        first = llm.create_completion("one two three four five six seven", max_tokens=16, temperature=0)
        history = "one two three four five six seven" + first["choices"][0]["text"]
        kept = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
        second = llm.create_completion(history + " eight nine ten", max_tokens=8, temperature=0)
        assert second["usage"]["kv"]["reused_tokens"] == kept
        again = llm.create_completion(history + " eight nine ten", max_tokens=8, temperature=0)
        assert again["usage"]["kv"]["reused_tokens"] >= kept
        assert again["choices"][0]["text"] == second["choices"][0]["text"]
        edited = llm.create_completion(history + " eleven twelve", max_tokens=8, temperature=0)
        kv = edited["usage"]["kv"]
        assert kv["reused_tokens"] == kept and kv["checkpoints"] >= 2 and kv["checkpoint_bytes"] > 0


def test_checkpoints_can_be_turned_off_or_bounded(arch_dir):
    from infokv_local.errors import CacheSettingsError

    kw = dict(n_threads=2, max_context=512, compact_at=4096, flash_attn=False)
    with Model(arch_dir / "qwen35-dense.gguf") as model:
        rng = np.random.default_rng(4)
        turns = [rng.integers(3, model.info.n_vocab, 12).tolist() for _ in range(4)]
        with Engine(model, "full", max_checkpoints=0, **kw) as eng:
            for t in turns:
                list(eng.generate(t, max_tokens=4, ignore_eos=True))
            assert len(eng.checkpoints) == 0 and not eng.can_truncate(len(eng.tokens) - 5)
        with Engine(model, "full", max_checkpoints=3, **kw) as eng:
            for t in turns:
                list(eng.generate(t, max_tokens=4, ignore_eos=True))
            # each 12-token turn (4 generated) starts at 16k, checkpointed there and before its last token: the newest 3
            assert len(eng.checkpoints) == 3 and eng.checkpoint_points() == [43, 48, 59]
        with pytest.raises(CacheSettingsError, match="max_checkpoints"):
            Engine(model, "full", max_checkpoints=-1, **kw)
    res = subprocess.run([sys.executable, "-m", "infokv_local", "generate", "Hello", "--model",
                          str(arch_dir / "qwen35-dense.gguf"), "--max-checkpoints", "-1", "--threads", "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "error: max_checkpoints must be" in res.stderr


@pytest.mark.parametrize("name", ["granitehybrid-dense", "qwen35-dense"])
def test_the_prompt_probe_leaves_a_hybrid_recurrent_state_as_it_found_it(arch_dir, name, monkeypatch):
    """On a hybrid memory the probe reads the prompt's end ahead in both parts; its cells leave the attention
    cache and the recurrent state it had before the probe comes back, byte for byte, before each compression."""
    from infokv_local.engine.compression import Compressor

    restored: list[bool] = []
    probe_window = Compressor.probe_window

    def checked(self):
        before = self.engine.ctx.save_bounded()
        window = probe_window(self)
        restored.append(self.engine.ctx.save_bounded() == before)
        return window

    monkeypatch.setattr(Compressor, "probe_window", checked)
    with Model(arch_dir / f"{name}.gguf") as model, \
            Engine(model, "infokv", budget=BUDGET, buffer=BUFFER, n_threads=2, check_invariants=True, compact_at=4096,
                   flash_attn=False, prompt_probe=True) as eng:
        assert eng.probe_len == BUFFER // 2
        prompt = np.random.default_rng(5).integers(3, model.info.n_vocab, 200).tolist()
        out = list(eng.generate(prompt, max_tokens=20, ignore_eos=True))
        assert len(out) == 20 and eng.probes > 3 and len(restored) == eng.probes and all(restored)
        assert eng.totals.max_used_cells <= BUDGET + BUFFER and max(s.peak_cells for s in eng.totals.history) <= \
            BUDGET + BUFFER
