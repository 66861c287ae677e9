"""An OpenAI-compatible HTTP server where every conversation lives in a fixed KV budget.

``python -m infokv_local serve``: FastAPI + uvicorn; ``--slots N`` :class:`~infokv_local.InfoKVLlama`
instances share one loaded model, idle conversations are parked in RAM and restored without
prefill (:mod:`.slots`), requests and responses are OpenAI's (:mod:`.schemas`, :mod:`.routes`; :mod:`.app`
puts the application together), with ``usage.kv``, ``GET /v1/kv`` and ``GET /metrics`` (:mod:`.metrics`)
telling what the caches hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # on first use: the command line registers ``serve`` without FastAPI (the serve extra) or llama.cpp loaded
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
