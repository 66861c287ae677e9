"""What a route needs from the application, as FastAPI dependencies.

``create_app`` keeps the pool, the settings, the metrics and the stop event on ``app.state``; the
routes name them by type (``pool: Pool``) and FastAPI hands them over. :func:`require_key` and
:func:`refuse_if_stopping` are checks a route lists in its ``dependencies``, run in that order before
its body is read. They are ``async``: a plain function would be run in a thread for every request.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

from fastapi import Depends, Request

from .config import ServerSettings
from .errors import APIError, stopping_error
from .metrics import Metrics
from .slots import SlotPool


async def get_pool(request: Request) -> SlotPool:
    pool: SlotPool = request.app.state.pool
    return pool


async def get_settings(request: Request) -> ServerSettings:
    settings: ServerSettings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_stopping(request: Request) -> asyncio.Event:
    """Set when the server stops (``app.state.request_stop()`` or the lifespan's end)."""
    stopping: asyncio.Event = request.app.state.stopping
    return stopping


Pool = Annotated[SlotPool, Depends(get_pool)]
Settings = Annotated[ServerSettings, Depends(get_settings)]
MetricsOf = Annotated[Metrics, Depends(get_metrics)]
Stopping = Annotated[asyncio.Event, Depends(get_stopping)]


async def require_key(request: Request, settings: Settings) -> None:
    if settings.api_key is None:
        return
    auth = request.headers.get("authorization", "")
    if not hmac.compare_digest(auth.encode(), f"Bearer {settings.api_key}".encode()):  # in constant time
        raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", param=None,
                       code="invalid_api_key")


async def refuse_if_stopping(stopping: Stopping) -> None:
    if stopping.is_set():
        raise stopping_error()
