"""The FastAPI application: OpenAI's endpoints, ``/v1/kv``, ``/metrics``, ``/health``.

Generation runs in a worker thread per request that pushes chunks to the event loop; the loop
only routes, formats and sends, so it never blocks. A client that goes away mid-stream sets a
flag the worker checks between tokens: the generation stops and the slot is freed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InfoKVError
from ..policies import make_policy
from ..settings import DEFAULTS
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest, ErrorBody, ErrorResponse, _Sampling, validation_param
from .slots import Lease, QueueFull, SlotPool


@dataclass
class ServerSettings:
    """What the server was started with."""

    model_id: str
    model_path: str
    policy: str
    budget: int
    buffer: int
    kv_bytes_per_cell: int
    prompt_probe: bool = DEFAULTS.prompt_probe
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    retry_after_s: int = 2
    model_aliases: tuple[str, ...] = ()

    @property
    def capacity(self) -> int:
        return self.budget + self.buffer


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


_DONE = object()


class _Worker:
    """Runs one request's chunk iterator in a thread and hands the chunks to the event loop."""

    def __init__(self, make: Callable[[], Iterator[dict[str, Any]]], executor: ThreadPoolExecutor) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancel = threading.Event()
        self.future = self.loop.run_in_executor(executor, self._run, make)

    def _run(self, make: Callable[[], Iterator[dict[str, Any]]]) -> None:
        put = self.queue.put_nowait
        try:
            chunks = make()
            try:
                for chunk in chunks:
                    self.loop.call_soon_threadsafe(put, chunk)
                    if self.cancel.is_set():
                        break
            finally:
                chunks.close()  # type: ignore[attr-defined]  # leaves the slot's cache consistent
        except BaseException as e:  # noqa: BLE001 (handed to the event loop)
            self.loop.call_soon_threadsafe(put, e)
        finally:
            self.loop.call_soon_threadsafe(put, _DONE)

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            item = await self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def stop(self) -> None:
        """Cancel (if still running) and wait for the thread to finish, even inside a cancelled scope."""
        self.cancel.set()
        with anyio.CancelScope(shield=True):
            await self.future


def create_app(pool: SlotPool, settings: ServerSettings) -> FastAPI:
    """The application serving ``pool``'s slots."""
    app = FastAPI(title="infokv-local", description="OpenAI-compatible server with a fixed KV budget per slot",
                  docs_url=None, redoc_url=None)
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=len(pool.slots) + 1, thread_name_prefix="infokv-gen")
    started = int(time.time())
    app.state.pool, app.state.metrics, app.state.settings = pool, metrics, settings
    accepted = {settings.model_id, settings.model_path, *settings.model_aliases}
    formatter = pool.slots[0].llm._chat_formatter

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        metrics.request(request.url.path, exc.status)
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Response:
        metrics.request(request.url.path, 500)
        return APIError(500, f"internal error: {exc}", type_="server_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        metrics.request("other", exc.status_code)
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), param=None, code=code).response()

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {settings.api_key}":
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", param=None,
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            raise APIError(413, f"request body over {settings.max_body_bytes} bytes", code="request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > settings.max_body_bytes:
                raise APIError(413, f"request body over {settings.max_body_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(body)
        except ValueError as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from e
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        return data

    def parse(model: type[_Sampling], data: dict[str, Any]) -> Any:
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            message, param = validation_param(e)
            raise APIError(400, message, param=param, code="invalid_value") from e
        if req.model and req.model not in accepted:
            raise APIError(404, f"The model '{req.model}' does not exist (this server has '{settings.model_id}')",
                           param="model", code="model_not_found")
        return req

    def cache_settings(req: _Sampling) -> tuple[str, int]:
        policy, budget = settings.policy, settings.budget
        if req.infokv is not None:
            if req.infokv.policy is not None:
                try:
                    p = make_policy(req.infokv.policy)
                except (ValueError, TypeError) as e:
                    raise APIError(400, str(e), param="infokv.policy", code="invalid_value") from e
                if not p.evicts:
                    raise APIError(400, f"policy {p.name!r} does not evict: a slot's cache must stay in its budget",
                                   param="infokv.policy", code="invalid_value")
                policy = req.infokv.policy
            if req.infokv.budget is not None:
                if req.infokv.budget > settings.budget:
                    raise APIError(400, f"infokv.budget is at most the server's budget ({settings.budget})",
                                   param="infokv.budget", code="invalid_value")
                budget = req.infokv.budget
        return policy, budget

    async def generate(request: Request, endpoint: str, req: _Sampling, prompt: str,
                       call: Callable[[Lease], Iterator[dict[str, Any]]], kind: str) -> Response:
        policy, budget = cache_settings(req)
        try:
            lease = await pool.acquire(prompt)
        except QueueFull as e:
            metrics.rejected_queue_full += 1
            raise APIError(503, "all slots are busy and the queue is full; retry later", type_="server_error",
                           code="queue_full", headers={"Retry-After": str(settings.retry_after_s)}) from e
        slot = lease.slot
        try:
            args = slot.llm._engine_args
            if (args["policy"], args["budget"]) != (policy, budget):
                try:
                    await anyio.to_thread.run_sync(lambda: slot.llm.configure(policy=policy, budget=budget))
                except ValueError as e:
                    raise APIError(400, str(e), param="infokv", code="invalid_value") from e
            kv_before = await anyio.to_thread.run_sync(slot.llm.kv_stats)
        except BaseException:
            await pool.release(slot, keep=False)
            raise
        worker = _Worker(lambda: call(lease), executor)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def decorate(chunk: dict[str, Any]) -> dict[str, Any]:
            chunk["model"] = settings.model_id
            if "kv" in chunk:
                chunk["kv"]["slot"] = slot.id
                chunk["kv"]["conversation"] = lease.conversation
                chunk["kv"]["restored"] = lease.action == "restore"
                slot.kv = chunk["kv"]
            return chunk

        async def finish(keep: bool, usage: dict[str, Any] | None) -> None:
            with anyio.CancelScope(shield=True):  # also when the client went away (a cancelled task)
                await worker.stop()
                if usage is not None:
                    metrics.finished(usage, kv_before)
                await pool.release(slot, keep)

        if req.stream:
            stream = worker.chunks()
            try:  # the prompt is read before the response starts: its errors get a status of their own
                first: dict[str, Any] | None = await stream.__anext__()
            except StopAsyncIteration:
                first = None
            except (InfoKVError, ValueError) as e:
                await finish(False, None)
                raise APIError(400, str(e), code="invalid_value") from e
            except BaseException:
                await finish(False, None)
                raise

            async def rest() -> AsyncIterator[dict[str, Any]]:
                if first is not None:
                    yield first
                    async for c in stream:
                        yield c

            async def events() -> AsyncIterator[str]:
                usage = None
                keep = True  # also after a disconnect: the cache is left consistent
                done = False
                ready: list[str] = []  # events not sent yet: sent together when the loop lags behind
                try:
                    async for chunk in rest():
                        chunk = decorate(chunk)
                        if "usage" in chunk:
                            usage = chunk["usage"]
                        elif include_usage:
                            chunk["usage"] = None
                        ready.append(f"data: {json.dumps(chunk)}\n\n")
                        if worker.queue.empty():
                            yield "".join(ready)
                            ready.clear()
                    if ready:
                        yield "".join(ready)
                    if include_usage and usage is not None:
                        last = {"id": chunk["id"], "object": chunk["object"], "created": chunk["created"],
                                "model": settings.model_id, "choices": [], "usage": usage}
                        yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                    done = True
                except Exception as e:  # noqa: BLE001 (reported in the stream: the headers are gone)
                    keep, done = False, True
                    err = {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                finally:
                    if not done:  # the client went away (seen here, or the response task was cancelled)
                        metrics.cancelled += 1
                    await finish(keep, usage)

            metrics.request(endpoint, 200)
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        chunks: list[dict[str, Any]] = []
        keep = False
        usage = None
        try:
            n = 0
            async for chunk in worker.chunks():
                chunks.append(decorate(chunk))
                usage = chunk.get("usage", usage)
                n += 1
                if n % 8 == 0 and await request.is_disconnected():
                    metrics.cancelled += 1
                    break
            keep = True  # after a disconnect too: the cache is left consistent
        except (InfoKVError, ValueError) as e:
            raise APIError(400, str(e), code="invalid_value") from e
        finally:
            await finish(keep, usage)
        if usage is None:  # cancelled
            return Response(status_code=499)
        metrics.request(endpoint, 200)
        return JSONResponse(_join(chunks, kind))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(request))
        try:
            messages = req.plain_messages()
            prompt = formatter()(messages=cast(Any, messages)).prompt
        except Exception as e:  # noqa: BLE001 (a template that refuses these messages)
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from e
        kw = req.sampling_kwargs(default_temperature=1.0)

        def call(lease: Lease) -> Iterator[dict[str, Any]]:
            return lease.slot.llm.create_chat_completion(messages, max_tokens=req.limit(), stream=True, **kw)

        return await generate(request, "/v1/chat/completions", req, prompt, call, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_key(request)
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        try:
            prompt = req.text()
        except ValueError as e:
            raise APIError(400, str(e), param="prompt", code="invalid_value") from e
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        kw = req.sampling_kwargs(default_temperature=1.0)

        def call(lease: Lease) -> Iterator[dict[str, Any]]:
            return lease.slot.llm.create_completion(prompt, max_tokens=req.max_tokens, stream=True, **kw)

        return await generate(request, "/v1/completions", req, prompt, call, "text")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        check_key(request)
        metrics.request("/v1/models", 200)
        return JSONResponse({"object": "list", "data": [{
            "id": settings.model_id, "object": "model", "created": started, "owned_by": "infokv-local",
            "path": settings.model_path, "policy": settings.policy, "budget": settings.budget,
            "buffer": settings.buffer, "prompt_probe": settings.prompt_probe, "slots": len(pool.slots)}]})

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok", "slots": len(pool.slots), "slots_idle": len(pool.free_slots()),
                             "queue": pool.waiting})

    @app.get("/v1/kv")
    async def kv(request: Request) -> Response:
        check_key(request)
        metrics.request("/v1/kv", 200)
        slots = [{"id": s.id, "state": "busy" if s.busy else "idle", "conversation": s.conversation,
                  "requests": s.requests, "kv": s.kv} for s in pool.slots]
        return JSONResponse({
            "model": settings.model_id, "policy": settings.policy, "budget": settings.budget,
            "buffer": settings.buffer, "prompt_probe": settings.prompt_probe, "capacity_per_slot": settings.capacity,
            "cells_limit": settings.capacity * len(pool.slots), "cells_used": pool.used_cells(),
            "kv_bytes_per_token": settings.kv_bytes_per_cell, "queue": pool.waiting, "slots": slots,
            "parked": {"conversations": pool.store.describe(), "bytes": pool.store.nbytes,
                       "max_bytes": pool.store.max_bytes, "parked_total": pool.parked_total,
                       "restored_total": pool.restored_total, "dropped_total": pool.store.dropped},
        })

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        check_key(request)
        metrics.request("/metrics", 200)
        return PlainTextResponse(metrics.render(pool, settings.capacity, settings.kv_bytes_per_cell),
                                 media_type="text/plain; version=0.0.4")

    return app


def _join(chunks: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """One response from a request's chunks (chat deltas or completion texts)."""
    last = chunks[-1]
    if kind == "chat":
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": last["choices"][0]["finish_reason"]}
        obj = "chat.completion"
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": last["choices"][0]["finish_reason"]}
        obj = "text_completion"
    return {"id": last["id"] or f"cmpl-{uuid.uuid4()}", "object": obj, "created": last["created"],
            "model": last["model"], "choices": [choice], "usage": last["usage"], "timings": last.get("timings")}
