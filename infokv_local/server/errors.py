"""The errors the server answers in OpenAI's shape, and the exception handlers that answer them.

:class:`APIError` is any refusal (its status, type, param and code); :class:`GoneBeforeBody` is a
client that hung up before its body was read, answered with a 499 nobody reads; :func:`stopping_error`
is the 503 of every request the server's stop cuts short.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import Metrics
from .schemas import ErrorBody, ErrorResponse


class GoneBeforeBody(Exception):
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


def stopping_error() -> APIError:
    return APIError(503, "the server is shutting down", type_="server_error", code="server_shutdown")


def gone(metrics: Metrics, endpoint: str) -> Response:
    """The answer nobody reads, to a request whose client went away before it was complete (nginx's 499)."""
    metrics.cancelled += 1
    metrics.request(endpoint, 499)
    return Response(status_code=499)


# the handlers take Exception (Starlette's type for a handler) and are registered for the class they answer

async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    _metrics(request).request(request.url.path, exc.status)
    return exc.response()


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    _metrics(request).request(request.url.path, 500)
    return APIError(500, f"internal error: {exc}", type_="server_error").response()


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    _metrics(request).request("other", exc.status_code)
    code = "not_found" if exc.status_code == 404 else None
    return APIError(exc.status_code, str(exc.detail), param=None, code=code).response()


async def gone_handler(request: Request, exc: Exception) -> Response:
    return gone(_metrics(request), request.url.path)


def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics
