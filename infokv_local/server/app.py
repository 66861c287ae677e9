"""The FastAPI application: OpenAI's endpoints, ``/v1/kv``, ``/metrics``, ``/health``.

Generation runs in a worker thread per request that pushes chunks to the event loop; the loop
only routes and sends: parsing a body, templating and encoding a prompt run in threads too, so
that a huge request never holds up the others. A client that goes away, wherever its request
is (waiting for a slot, its prompt being tokenized or read, its reply being generated), cancels
it: a queued request leaves the queue at once, a running one stops at its next prompt chunk or
token and frees its slot, whose conversation stays as far as it got (parked as usual). When the
server stops (SIGTERM, Ctrl-C), every request in flight is cancelled the same way and answered
with a 503, or an error event in a stream that had begun.

One job per module: :mod:`.routes` (the endpoints), :mod:`.parsing` (a request's body read and
checked), :mod:`.generation` (a slot leased, the reply whole or streamed), :mod:`.errors` (OpenAI's
error bodies and the exception handlers), :mod:`.dependencies` (what a route takes from
``app.state``); here the application is put together.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServerSettings
from .errors import (
    APIError,
    GoneBeforeBody,
    api_error_handler,
    gone_handler,
    http_error_handler,
    internal_error_handler,
)
from .metrics import Metrics
from .routes import router
from .slots import SlotPool

__all__ = ["APIError", "ServerSettings", "create_app"]


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
    app.state.pool, app.state.metrics, app.state.settings = pool, Metrics(), settings
    app.state.stopping, app.state.started = stopping, int(time.time())
    app.state.request_stop = request_stop
    app.state.executor = ThreadPoolExecutor(max_workers=len(pool.slots) + 1, thread_name_prefix="infokv-gen")
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(GoneBeforeBody, gone_handler)
    app.include_router(router)
    return app
