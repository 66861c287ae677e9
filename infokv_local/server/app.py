"""The FastAPI application: OpenAI's endpoints, ``/v1/kv``, ``/metrics``, ``/health``.

Generation runs in a worker thread per request that pushes chunks to the event loop; the loop
only routes and sends: parsing a body, templating and encoding a prompt run in threads too, so
that a huge request never holds up the others. A client that goes away, wherever its request
is (waiting for a slot, its prompt being tokenized or read, its reply being generated), cancels
it: a queued request leaves the queue at once, a running one stops at its next prompt chunk or
token and frees its slot, whose conversation stays as far as it got (parked as usual). When the
server stops (SIGTERM, Ctrl-C), every request in flight is cancelled the same way and answered
with a 503, or an error event in a stream that had begun.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from ..errors import InfoKVError, PromptTooLongError, RequestCancelled
from ..llamacpp.model import text_bytes
from ..policies import make_policy
from ..settings import DEFAULTS
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest, ErrorBody, ErrorResponse, _Sampling, validation_param
from .slots import Abandoned, Lease, QueueFull, SlotPool
from .worker import ClientGone, ServerStopping, Watch, Worker


@dataclass
class ServerSettings:
    """What the server was started with."""

    model_id: str
    model_path: str
    policy: str
    budget: int
    buffer: int
    kv_bytes_per_cell: int
    memory: str = "dense"  # docs/memory.md
    bounded_bytes_per_slot: int = 0  # the part of a slot's memory that does not grow (sliding window, recurrent)
    prompt_probe: bool = DEFAULTS.prompt_probe
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    max_prompt_tokens: int | None = None  # prompt tokens a request may have to read (None: no limit)
    retry_after_s: int = 2
    model_aliases: tuple[str, ...] = ()
    # the slots share one context: the policy needs its statistics meet (None: each slot has a context of its own)
    shared_statistics: frozenset[str] | None = None

    @property
    def capacity(self) -> int:
        return self.budget + self.buffer


class _Gone(Exception):
    """The client disconnected before its request's body was read."""


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def create_app(pool: SlotPool, settings: ServerSettings) -> FastAPI:
    """The application serving ``pool``'s slots. ``app.state.request_stop()`` (safe in a signal handler)
    cancels every request in flight and refuses new ones: the first step of a shutdown."""
    stopping = asyncio.Event()
    loop: list[asyncio.AbstractEventLoop] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loop.append(asyncio.get_running_loop())
        yield
        stopping.set()

    def request_stop() -> None:
        if loop and not loop[0].is_closed():
            loop[0].call_soon_threadsafe(stopping.set)

    app = FastAPI(title="infokv-local", description="OpenAI-compatible server with a fixed KV budget per slot",
                  docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=len(pool.slots) + 1, thread_name_prefix="infokv-gen")
    started = int(time.time())
    app.state.pool, app.state.metrics, app.state.settings = pool, metrics, settings
    app.state.request_stop, app.state.executor = request_stop, executor
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

    def refuse_if_stopping() -> None:
        if stopping.is_set():
            raise _stopping_error()

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            raise APIError(413, f"request body over {settings.max_body_bytes} bytes", code="request_too_large")
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > settings.max_body_bytes:
                    raise APIError(413, f"request body over {settings.max_body_bytes} bytes",
                                   code="request_too_large")
        except ClientDisconnect as e:  # gone before its body was read
            raise _Gone() from e
        return bytes(body)

    def parse(model: type[_Sampling], body: bytes) -> Any:
        """The request from its body (run in a thread: a body of megabytes takes a while to parse)."""
        try:
            data = json.loads(body)
        except ValueError as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from e
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
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
                missing = p.needs - (settings.shared_statistics or p.needs)
                if missing:
                    raise APIError(400, f"policy {p.name!r} needs {', '.join(sorted(missing))}, which the context "
                                        f"this server's slots share does not collect (it would turn flash attention "
                                        f"off for every slot); start the server with --policy {p.name} or --slots 1 "
                                        f"to offer it", param="infokv.policy", code="invalid_value")
                policy = req.infokv.policy
            if req.infokv.budget is not None:
                if req.infokv.budget > settings.budget:
                    raise APIError(400, f"infokv.budget is at most the server's budget ({settings.budget})",
                                   param="infokv.budget", code="invalid_value")
                budget = req.infokv.budget
        return policy, budget

    def request_error(e: Exception, prompt_param: str) -> APIError:
        """The 400 of an error the request's generation raised about its input."""
        if isinstance(e, PromptTooLongError):
            return APIError(400, f"{e}; this server reads at most {settings.max_prompt_tokens} prompt tokens per "
                                 f"request (--max-prompt-tokens)", param=prompt_param,
                            code="context_length_exceeded")
        return APIError(400, str(e), code="invalid_value")

    @app.exception_handler(_Gone)
    async def _gone(request: Request, exc: _Gone) -> Response:
        return gone(request.url.path)

    def gone(endpoint: str) -> Response:
        """The answer nobody reads, to a request whose client went away before it was complete (nginx's 499)."""
        metrics.cancelled += 1
        metrics.request(endpoint, 499)
        return Response(status_code=499)

    def ended(watch: Watch, endpoint: str) -> Response:
        """The answer to a request cut short by its client's disconnect (nobody reads it) or the server's stop."""
        try:
            watch.check()
        except ClientGone:
            return gone(endpoint)
        except ServerStopping as e:
            raise _stopping_error() from e
        raise AssertionError("the request was not cut short")

    async def generate(request: Request, endpoint: str, req: _Sampling, prompt: str,
                       call: Callable[[Lease, threading.Event], Iterator[dict[str, Any]]], kind: str,
                       prompt_param: str) -> Response:
        policy, budget = cache_settings(req)
        watch = Watch(request.receive, stopping)
        streaming = False
        try:
            watch.on_end(lambda: asyncio.ensure_future(pool.wake()))
            try:
                data = await anyio.to_thread.run_sync(text_bytes, prompt)
            except ValueError:
                data = b""  # not text: matches no cache; the generation says why
            try:
                lease = await pool.acquire(data, abandoned=lambda: watch.ended)
            except QueueFull as e:
                metrics.rejected_queue_full += 1
                raise APIError(503, "all slots are busy and the queue is full; retry later", type_="server_error",
                               code="queue_full", headers={"Retry-After": str(settings.retry_after_s)}) from e
            except Abandoned:
                return ended(watch, endpoint)
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
            worker = Worker(lambda cancel: call(lease, cancel), executor)
            watch.on_end(worker.cancel.set)
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
                except RequestCancelled:
                    await finish(True, None)
                    return ended(watch, endpoint)
                except (InfoKVError, ValueError) as e:
                    await finish(isinstance(e, PromptTooLongError), None)  # a refused prompt changed nothing
                    raise request_error(e, prompt_param) from e
                except BaseException:
                    await finish(False, None)
                    raise
                if first is None:  # cancelled right after the prompt
                    await finish(True, None)
                    return ended(watch, endpoint)

                closed = False

                async def close_stream(done: bool, keep: bool, usage: dict[str, Any] | None) -> None:
                    nonlocal closed
                    if closed:
                        return
                    closed = True
                    watch.close()
                    metrics.request(endpoint, 200 if done else 499)
                    if not done:  # the client went away (seen here, or the response task was cancelled)
                        metrics.cancelled += 1
                    await finish(keep, usage)

                async def events() -> AsyncGenerator[str, None]:
                    usage = None
                    keep = True  # also after a disconnect: the cache is left consistent
                    done = False  # the response is complete (its end, or an error event, was sent)
                    ready: list[str] = []  # events not sent yet: sent together when the loop lags behind
                    chunk = first
                    try:
                        try:
                            async for chunk in _chain([first], stream):
                                chunk = decorate(chunk)
                                if "usage" in chunk:
                                    usage = chunk["usage"]
                                elif include_usage:
                                    chunk["usage"] = None
                                ready.append(f"data: {json.dumps(chunk)}\n\n")
                                if worker.queue.empty():
                                    yield "".join(ready)
                                    ready.clear()
                            if usage is None:  # the worker stopped: cancelled
                                raise RequestCancelled("the request was cancelled")
                        except RequestCancelled:
                            if watch.gone.is_set() or not watch.stopping.is_set():
                                return  # the client went: nothing to send
                            ready.append(_event(_stopping_error().body()))
                            yield "".join(ready)
                            done = True
                            return
                        if ready:
                            yield "".join(ready)
                        if include_usage and usage is not None:
                            last = {"id": chunk["id"], "object": chunk["object"], "created": chunk["created"],
                                    "model": settings.model_id, "choices": [], "usage": usage}
                            yield _event(last)
                        yield "data: [DONE]\n\n"
                        done = True
                    except Exception as e:  # noqa: BLE001 (reported in the stream: the headers are gone)
                        keep, done = False, True
                        yield _event({"error": {"message": str(e), "type": "server_error", "param": None,
                                                "code": None}})
                    finally:
                        await close_stream(done, keep, usage)

                streaming = True
                # closed however the response ends (events() never starts when the client went before it)
                return _ClosingStream(events(), lambda: close_stream(False, True, None))

            chunks: list[dict[str, Any]] = []
            keep = True  # after a disconnect too: the cache is left consistent
            usage = None
            try:
                async for chunk in worker.chunks():
                    chunks.append(decorate(chunk))
                    usage = chunk.get("usage", usage)
            except RequestCancelled:
                pass
            except (InfoKVError, ValueError) as e:
                keep = isinstance(e, PromptTooLongError)
                raise request_error(e, prompt_param) from e
            except BaseException:
                keep = False
                raise
            finally:
                await finish(keep, usage)
            if usage is None:  # cancelled
                return ended(watch, endpoint)
            metrics.request(endpoint, 200)
            return JSONResponse(_join(chunks, kind))
        finally:
            if not streaming:
                watch.close()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        refuse_if_stopping()
        body = await read_body(request)

        def prepare() -> tuple[ChatCompletionRequest, list[dict[str, str]], str]:
            req: ChatCompletionRequest = parse(ChatCompletionRequest, body)
            try:
                messages = req.plain_messages()
                prompt = formatter()(messages=cast(Any, messages)).prompt
            except Exception as e:  # noqa: BLE001 (a template that refuses these messages)
                raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from e
            return req, messages, prompt

        req, messages, prompt = await anyio.to_thread.run_sync(prepare)
        kw = req.sampling_kwargs(default_temperature=1.0)

        def call(lease: Lease, cancel: threading.Event) -> Iterator[dict[str, Any]]:
            return lease.slot.llm.create_chat_completion(messages, max_tokens=req.limit(), stream=True, cancel=cancel,
                                                         max_prompt_tokens=settings.max_prompt_tokens, **kw)

        return await generate(request, "/v1/chat/completions", req, prompt, call, "chat", "messages")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_key(request)
        refuse_if_stopping()
        body = await read_body(request)
        req: CompletionRequest = await anyio.to_thread.run_sync(parse, CompletionRequest, body)
        try:
            prompt = req.text()
        except ValueError as e:
            raise APIError(400, str(e), param="prompt", code="invalid_value") from e
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        kw = req.sampling_kwargs(default_temperature=1.0)

        def call(lease: Lease, cancel: threading.Event) -> Iterator[dict[str, Any]]:
            return lease.slot.llm.create_completion(prompt, max_tokens=req.max_tokens, stream=True, cancel=cancel,
                                                    max_prompt_tokens=settings.max_prompt_tokens, **kw)

        return await generate(request, "/v1/completions", req, prompt, call, "text", "prompt")

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
        return JSONResponse({"status": "stopping" if stopping.is_set() else "ok", "slots": len(pool.slots),
                             "slots_idle": len(pool.free_slots()), "queue": pool.waiting},
                            status_code=503 if stopping.is_set() else 200)

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
            "kv_bytes_per_token": settings.kv_bytes_per_cell, "memory": settings.memory,
            "bounded_bytes_per_slot": settings.bounded_bytes_per_slot,
            "kv_bytes_limit": len(pool.slots) * (settings.capacity * settings.kv_bytes_per_cell
                                                 + settings.bounded_bytes_per_slot),
            "queue": pool.waiting, "slots": slots, "batching": pool.batching(),
            "parked": {"conversations": pool.store.describe(), "bytes": pool.store.nbytes,
                       "max_bytes": pool.store.max_bytes, "parked_total": pool.parked_total,
                       "restored_total": pool.restored_total, "dropped_total": pool.store.dropped},
        })

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        check_key(request)
        metrics.request("/metrics", 200)
        return PlainTextResponse(metrics.render(pool, settings.capacity, settings.kv_bytes_per_cell,
                                                settings.bounded_bytes_per_slot),
                                 media_type="text/plain; version=0.0.4")

    return app


class _ClosingStream(StreamingResponse):
    """A server-sent event stream cleaned up however its response ends: the body's generator is closed
    (its ``finally`` runs now, not whenever it is collected), then ``on_end`` runs, which also covers a
    client that went away before the first byte, when the generator never started."""

    def __init__(self, body: AsyncGenerator[str, None], on_end: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._body, self._on_end = body, on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._body.aclose()
                await self._on_end()


def _stopping_error() -> APIError:
    return APIError(503, "the server is shutting down", type_="server_error", code="server_shutdown")


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _chain(first: list[dict[str, Any]], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in first:
        yield item
    async for item in rest:
        yield item


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
