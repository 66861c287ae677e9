"""Engine, context and model layer: one error hierarchy, all-or-nothing state changes, bounded
history, bad sizes refused before anything is allocated, two threads on one model. Real model."""

from __future__ import annotations

import ast
import inspect
import threading
from pathlib import Path

import numpy as np
import pytest

import infokv_local
from infokv_local import engine, errors
from infokv_local.api import InfoKVLlama, model_lock
from infokv_local.api.text_stream import token_bytes
from infokv_local.engine import HISTORY_STEPS, Engine, EngineTotals, StepStats
from infokv_local.llamacpp import context, kernels
from infokv_local.llamacpp.context import StatsContext
from infokv_local.policies import InfoKVPolicy, ScoreInput, make_policy

from .conftest import ESSAY

PACKAGE = Path(infokv_local.__file__).parent


# ---- one error hierarchy ----------------------------------------------------------------------
def test_every_public_error_is_an_infokv_error():
    public = {name: obj for name, obj in vars(errors).items() if inspect.isclass(obj) and issubclass(obj, Exception)}
    assert {"CacheFull", "BudgetError", "ContextFullError", "PolicyError", "DecodeError", "ModelFileError",
            "UnpatchedLibraryError", "UnsupportedArchitectureError"} <= set(public)
    for name, cls in public.items():
        assert issubclass(cls, errors.InfoKVError), name
        assert cls.__doc__, name
    for name in infokv_local.__all__:
        obj = getattr(infokv_local, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, errors.InfoKVError), name
    # declared once, importable from the modules that raised them before
    assert context.CacheFull is errors.CacheFull
    assert engine.BudgetError is errors.BudgetError and engine.ContextFullError is errors.ContextFullError
    assert kernels.UnpatchedLibraryError is errors.UnpatchedLibraryError


LAYER = ["engine", "llamacpp", "models", "policies"]


def test_no_exception_class_is_declared_outside_errors_py():
    """In the engine/context/model layer and the policies (the command line's modules have their own review)."""
    for path in (p for name in LAYER for p in (PACKAGE / name).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                assert not bases & {"Exception", "ValueError", "RuntimeError"} and not any(
                    b.endswith("Error") for b in bases), f"{path.name}: class {node.name}({', '.join(bases)})"


def test_a_full_cache_is_an_infokv_error(model):
    with StatsContext(model, n_ctx=256, n_batch=64, attn=False, layer_dist=False, entropy_top_k=None) as ctx:
        for s in range(0, 256, 64):
            ctx.decode(list(range(100, 164)), s)
        with pytest.raises(errors.InfoKVError, match="no free cells"):
            ctx.decode([100], 256)
        assert ctx.n_used == 256  # nothing was changed


@pytest.mark.parametrize("spec", ["lru", "infokv:alpha=2", "infokv:nonsense=1", "snapkv:pooling=median",
                                  "h2o:recent_ratio=-1", "infokv:alpha"])
def test_unknown_policy_or_parameter_is_a_policy_error(spec):
    with pytest.raises(errors.PolicyError) as e:
        make_policy(spec)
    assert isinstance(e.value, errors.InfoKVError) and isinstance(e.value, ValueError)
    assert str(e.value)


def test_no_assert_with_a_side_effect_in_the_package():
    """``python -O`` drops asserts: a call into llama.cpp or the kernels must never sit inside one."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assert):
                for call in (n for n in ast.walk(node.test) if isinstance(n, ast.Call)):
                    name = ast.unparse(call.func)
                    assert not name.startswith(("llama.", "native.", "lib.", "ctx.", "self.")), \
                        f"{path.relative_to(PACKAGE)}:{node.lineno}: assert calls {name}"


# ---- bad sizes, refused before anything is allocated ---------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=20), "at least 37"),
    (dict(budget=0), "positive"),
    (dict(budget=-5), "positive"),
    (dict(budget=10**9), "trained context"),
    (dict(budget=None), "give a budget"),
    (dict(budget=None, budget_mib=0), "positive"),
    (dict(budget=None, budget_mib=-1.0), "positive"),
    (dict(budget=None, budget_mib=10**6), "trained context"),
    (dict(budget=None, budget_mib=1e-6), "holds no token"),
    (dict(budget=128.5), "whole number"),
    (dict(budget="128"), "whole number"),
    (dict(buffer=0), "positive"),
    (dict(buffer=-1), "positive"),
    (dict(n_sink=-1), "n_sink"),
    (dict(n_recent=0), "n_recent"),
    (dict(window=0), "positive"),
    (dict(n_batch=0), "positive"),
    (dict(policy="full", max_context=0), "max_context"),
    (dict(policy="full", max_context=-10), "max_context"),
    (dict(compact_at=100, budget=96, buffer=16), "compact_at"),
])
def test_bad_sizes_are_clear_budget_errors(model, kwargs, message):
    args = dict(policy="infokv", budget=128, buffer=32) | kwargs
    with pytest.raises(errors.BudgetError, match=message) as e:
        Engine(model, **args)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(("spec", "message"), [("nope", "unknown policy 'nope'"),
                                               ("infokv:alpha=1.5", r"alpha must be a number in \[0, 1\]"),
                                               ("tova:window=3", "unexpected keyword argument 'window'")])
def test_engine_refuses_an_unknown_policy_or_parameter(model, spec, message):
    with pytest.raises(errors.PolicyError, match=message):
        Engine(model, spec, budget=64, buffer=16)


def test_empty_prompt_with_nothing_cached_is_refused(model):
    with Engine(model, "infokv", budget=64, buffer=16) as eng:
        with pytest.raises(errors.EmptyPromptError, match="empty"):
            list(eng.generate([], 5))
        assert eng.used_cells == 0 and eng.tokens == []
        assert len(list(eng.generate(model.tokenize("Hello"), 3, ignore_eos=True))) == 3  # still usable


# ---- all-or-nothing state changes -------------------------------------------------------------
def test_truncate_that_cannot_happen_changes_nothing(model, tokens):
    with Engine(model, "infokv", budget=48, buffer=16, n_recent=8, check_invariants=True) as eng:
        out = list(eng.generate(tokens[:200], 5, ignore_eos=True))
        assert len(out) == 5 and eng.pending_token == out[-1]
        before = (list(eng.tokens), eng.pending_token, eng.n_past, eng.ctx.cell_map()[0].tolist())
        assert eng.truncate(10) is False  # token 10 onwards are partly evicted
        assert (list(eng.tokens), eng.pending_token, eng.n_past, eng.ctx.cell_map()[0].tolist()) == before
        # the pending token is still decoded when the sequence goes on
        more = list(eng.generate([], 3, ignore_eos=True))
        assert eng.tokens[len(before[0]) - 1] == before[1] and len(more) == 3
        n = len(eng.tokens)
        assert eng.truncate(n - 4) is True and len(eng.tokens) == n - 4 and eng.pending_token is None
        assert eng.ctx.cell_map()[1].max() == eng.n_past - 1


def test_truncate_into_evicted_history_keeps_the_invariant_check_exact(model, tokens):
    """After a truncation, positions evicted while they were old can be among the most recent ``n_recent``
    ones: the check accepts those holes (a regenerated answer of a compressed prompt goes on), and still
    fails when a recent token goes missing afterwards."""
    with Engine(model, "infokv", budget=48, buffer=16, n_recent=16, check_invariants=True) as eng:
        list(eng.generate(tokens[:40], 30, ignore_eos=True))  # the prompt is compressed while generating
        n = len(eng.tokens)
        assert eng.truncate(n - 16) is True  # the generated tail goes; earlier prompt holes become recent
        _, pos = eng.ctx.cell_map()
        recent = set(range(eng.n_past - 16, eng.n_past))
        assert recent - set(pos.tolist()), "the truncation should bring evicted positions into the recent window"
        assert len(list(eng.generate(tokens[40:42], 20, ignore_eos=True))) == 20  # checked at every step
        cells, pos = eng.ctx.cell_map()
        eng.ctx.remove_cells(cells[pos == pos.max() - 1])  # a recent token lost behind the engine's back
        eng.cells.forget(cells[pos == pos.max() - 1])
        with pytest.raises(AssertionError, match="protected positions evicted"):
            list(eng.generate([], 2, ignore_eos=True))


def test_truncate_then_new_tokens_get_the_entropy_that_produced_them(model, tokens):
    with Engine(model, "infokv", budget=512, buffer=64) as ref, Engine(model, "infokv", budget=512, buffer=64) as eng:
        ref.prefill(tokens[:60])
        ref.prefill(tokens[60:70])
        eng.prefill(tokens[:60])
        eng.prefill(tokens[80:95])  # a continuation taken back
        assert eng.truncate(60) is True
        eng.prefill(tokens[60:70])
        cells_ref, cells = ref.ctx.cell_map()[0], eng.ctx.cell_map()[0]
        np.testing.assert_allclose(eng.cells.ent_prod[cells], ref.cells.ent_prod[cells_ref], atol=1e-4)


def test_compaction_through_the_context_keeps_generating(model):
    with Engine(model, "snapkv", budget=96, buffer=16, n_recent=16, compact_at=200, check_invariants=True) as eng:
        list(eng.generate(model.tokenize("Count slowly:"), 300, ignore_eos=True))
        assert eng.compactions >= 1
        _, pos = eng.ctx.cell_map()
        assert pos.max() == eng.n_past - 1 < 200


def test_compact_positions_renumbers_in_order(model):
    with StatsContext(model, n_ctx=256, n_batch=64, attn=False, layer_dist=False, entropy_top_k=None) as ctx:
        ctx.decode(list(range(200, 260)), 0)
        cells, pos = ctx.cell_map()
        ctx.remove_cells(cells[[5, 6, 20, 40]])
        order = ctx.cell_map()[0]
        assert ctx.compact_positions() == 56
        cells2, pos2 = ctx.cell_map()
        assert pos2.tolist() == list(range(56)) and cells2.tolist() == order.tolist()


# ---- bounded history, exact peaks -------------------------------------------------------------
def _step(i: int, used: int, n: int = 1, evicted: int = 0, first: int = 0) -> StepStats:
    return StepStats(step=i, n_tokens=n, used_cells=used, budget=0, capacity=0, kv_bytes=0, evicted=evicted,
                     evicted_positions=[], score_s=0.0, evict_s=0.0, decode_s=0.0, first_token=first)


def test_history_is_bounded_and_peaks_stay_exact():
    rng = np.random.default_rng(0)
    used = rng.integers(1, 300, size=3 * HISTORY_STEPS)
    t = EngineTotals()
    for i, u in enumerate(used):
        t.record(_step(i, int(u), first=i))
        if i % 997 == 0:
            for start in (0, i // 2, i):
                assert t.max_used_since(start) == used[start : i + 1].max()
    assert len(t.history) == HISTORY_STEPS and t.history[0].step == len(used) - HISTORY_STEPS
    assert len(t._peaks) <= 300
    assert t.max_used_cells == used.max() and t.max_used_since(len(used)) == 0
    pts = t.cell_history()
    assert pts[0][0] == len(used) - HISTORY_STEPS + 1 and pts[-1] == (len(used), int(used[-1]))


def test_api_reads_the_bounded_history(model):
    with InfoKVLlama(model, budget=48, buffer=16, n_recent=8) as llm:
        llm.create_completion(ESSAY * 2, max_tokens=40, temperature=0)  # 2 x 90 prompt tokens: compressions
        pts = llm.cell_history()
        hist = llm.engine.totals.history
        assert pts[-1] == (llm.engine.totals.tokens, hist[-1].used_cells)
        assert max(u for _, u in pts) == 64 and min(u for _, u in pts[5:]) >= 48
        assert pts[0] == (hist[0].n_tokens, hist[0].used_cells)  # the saw-tooth starts at the first step
        out = llm.create_completion("Tell me a story.", max_tokens=5, temperature=0)  # a new sequence: no eviction
        kv = out["usage"]["kv"]
        assert kv["max_used_cells"] == kv["used_cells"] < 48


# ---- model helpers the API uses -----------------------------------------------------------------
def test_model_token_pieces_and_special_ids(model):
    toks = model.tokenize("Hello, world", add_special=False)
    assert b"".join(model.token_bytes(t) for t in toks) == b"Hello, world"
    assert token_bytes(model, toks[0]) == model.token_bytes(toks[0])  # the old helper is a thin wrapper
    assert model.eos_token_id >= 0 and model.is_eog(model.eos_token_id)
    assert model.token_bytes(model.eos_token_id, special=True) == b"<|im_end|>"
    assert model.token_bytes(model.eos_token_id, special=False) == b""
    assert model.bos_token_id >= 0


def test_undecodable_bytes_are_tokenized_as_bytes_and_lone_surrogates_are_named(model):
    raw = b"caf\xe9 \xff end"
    text = raw.decode("utf-8", "surrogateescape")  # what Python makes of such bytes in argv
    assert model.tokenize(text) == model.tokenize(raw)
    with pytest.raises(errors.InvalidTextError, match=r"U\+D800 at character 4"):
        model.tokenize("abcd\ud800efg")


# ---- two threads on one model -----------------------------------------------------------------
class _Watching(InfoKVPolicy):
    """InfoKV, noting whether its model's lock is held and whether another thread is inside an engine step."""

    inside: list[int] = [0]
    seen: list[tuple[bool, int]] = []

    def score(self, inp: ScoreInput) -> np.ndarray:
        self.inside[0] += 1
        try:
            self.seen.append((model_lock(self._model).locked(), self.inside[0]))
            return super().score(inp)
        finally:
            self.inside[0] -= 1


def test_two_threads_on_one_model_take_turns_and_get_what_they_get_alone(model):
    prompts = [ESSAY, "Rain forms when water vapour cools. " + ESSAY]  # 90+ tokens: compressed while read
    kwargs = dict(max_tokens=40, temperature=0)

    def make() -> InfoKVLlama:
        pol = _Watching()
        pol._model = model
        return InfoKVLlama(model, policy=pol, budget=48, buffer=16, n_recent=8, check_invariants=True)

    alone = []
    for p in prompts:
        with make() as llm:
            alone.append(llm.create_completion(p, **kwargs)["choices"][0]["text"])
    _Watching.seen.clear()
    results: dict[int, str] = {}
    errors_seen: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(i: int) -> None:
        try:
            with make() as llm:
                barrier.wait()
                text = ""
                for chunk in llm.create_completion(prompts[i], stream=True, **kwargs):
                    text += chunk["choices"][0]["text"]
                results[i] = text
        except BaseException as e:  # reported below
            errors_seen.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors_seen, errors_seen
    assert [results[0], results[1]] == alone
    assert len(_Watching.seen) >= 4  # both evicted several times
    assert all(locked and depth == 1 for locked, depth in _Watching.seen)
