"""An OpenAI-compatible HTTP server where every conversation lives in a fixed KV budget.

``python -m infokv_local serve``: FastAPI + uvicorn; ``--slots N`` :class:`~infokv_local.InfoKVLlama`
instances share one loaded model, idle conversations are parked in RAM and restored without
prefill (:mod:`.slots`), requests and responses are OpenAI's (:mod:`.schemas`, :mod:`.app`), with
``usage.kv``, ``GET /v1/kv`` and ``GET /metrics`` (:mod:`.metrics`) telling what the caches hold.
"""

from .app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
