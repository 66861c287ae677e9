"""The endpoints: OpenAI's ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``, and
``/v1/kv`` (what the slots' caches hold), ``/metrics`` (Prometheus), ``/health``.

Every endpoint but ``/health`` asks for the API key when the server has one; the two that generate
refuse new requests once the server is stopping. Parsing a body and templating a prompt run in a
thread, so that a huge request never holds up the others.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .dependencies import MetricsOf, Pool, Settings, Stopping, refuse_if_stopping, require_key
from .generation import generate
from .parsing import chat_request, completion_prompt, parse, read_body
from .schemas import CompletionRequest
from .slots import Lease

router = APIRouter()

_GENERATING = [Depends(require_key), Depends(refuse_if_stopping)]  # in this order: a 401 before a 503


@router.post("/v1/chat/completions", dependencies=_GENERATING)
async def chat_completions(request: Request, pool: Pool, settings: Settings) -> Response:
    body = await read_body(request)
    req, messages, prompt = await anyio.to_thread.run_sync(chat_request, body, settings,
                                                           pool.slots[0].llm._chat_formatter)
    kw = req.sampling_kwargs(default_temperature=1.0)

    def call(lease: Lease, cancel: threading.Event) -> Iterator[dict[str, Any]]:
        return lease.slot.llm.create_chat_completion(messages, max_tokens=req.limit(), stream=True, cancel=cancel,
                                                     max_prompt_tokens=settings.max_prompt_tokens, **kw)

    return await generate(request, "/v1/chat/completions", req, prompt, call, "chat", "messages")


@router.post("/v1/completions", dependencies=_GENERATING)
async def completions(request: Request, settings: Settings) -> Response:
    body = await read_body(request)
    req: CompletionRequest = await anyio.to_thread.run_sync(parse, CompletionRequest, body, settings)
    prompt = completion_prompt(req)
    kw = req.sampling_kwargs(default_temperature=1.0)

    def call(lease: Lease, cancel: threading.Event) -> Iterator[dict[str, Any]]:
        return lease.slot.llm.create_completion(prompt, max_tokens=req.max_tokens, stream=True, cancel=cancel,
                                                max_prompt_tokens=settings.max_prompt_tokens, **kw)

    return await generate(request, "/v1/completions", req, prompt, call, "text", "prompt")


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def models(request: Request, pool: Pool, settings: Settings, metrics: MetricsOf) -> Response:
    metrics.request("/v1/models", 200)
    return JSONResponse({"object": "list", "data": [{
        "id": settings.model_id, "object": "model", "created": request.app.state.started, "owned_by": "infokv-local",
        "path": settings.model_path, "policy": settings.policy, "budget": settings.budget,
        "buffer": settings.buffer, "prompt_probe": settings.prompt_probe, "slots": len(pool.slots)}]})


@router.get("/health")
async def health(pool: Pool, stopping: Stopping) -> Response:
    return JSONResponse({"status": "stopping" if stopping.is_set() else "ok", "slots": len(pool.slots),
                         "slots_idle": len(pool.free_slots()), "queue": pool.waiting},
                        status_code=503 if stopping.is_set() else 200)


@router.get("/v1/kv", dependencies=[Depends(require_key)])
async def kv(pool: Pool, settings: Settings, metrics: MetricsOf) -> Response:
    metrics.request("/v1/kv", 200)
    slots = [{"id": s.id, "state": "busy" if s.busy else "idle", "conversation": s.conversation,
              "requests": s.requests, "kv": s.kv} for s in pool.slots]
    return JSONResponse({
        "model": settings.model_id, "policy": settings.policy, "budget": settings.budget,
        "buffer": settings.buffer, "prompt_probe": settings.prompt_probe, "capacity_per_slot": settings.capacity,
        "cells_limit": settings.capacity * len(pool.slots), "cells_used": pool.used_cells(),
        "kv_bytes_per_token": settings.kv_bytes_per_cell, "memory": settings.memory,
        "bounded_bytes_per_slot": settings.bounded_bytes_per_slot,
        "kv_bytes_limit": len(pool.slots) * (settings.capacity * settings.kv_bytes_per_cell
                                             + settings.bounded_bytes_per_slot),
        "queue": pool.waiting, "slots": slots, "batching": pool.batching(),
        "parked": {"conversations": pool.store.describe(), "bytes": pool.store.nbytes,
                   "max_bytes": pool.store.max_bytes, "parked_total": pool.parked_total,
                   "restored_total": pool.restored_total, "dropped_total": pool.store.dropped},
    })


@router.get("/metrics", dependencies=[Depends(require_key)])
async def prometheus(pool: Pool, settings: Settings, metrics: MetricsOf) -> Response:
    metrics.request("/metrics", 200)
    return PlainTextResponse(metrics.render(pool, settings.capacity, settings.kv_bytes_per_cell,
                                            settings.bounded_bytes_per_slot),
                             media_type="text/plain; version=0.0.4")
