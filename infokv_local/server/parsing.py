"""A request's body read, parsed and checked: each refusal is an :class:`~.errors.APIError`.

:func:`parse` and :func:`chat_request` run in a thread (a body of megabytes takes a while to parse,
a chat template to apply); :func:`read_body` on the event loop, as the body arrives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from fastapi import Request
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from ..errors import PromptTooLongError
from ..policies import make_policy
from .config import ServerSettings
from .errors import APIError, GoneBeforeBody
from .schemas import ChatCompletionRequest, CompletionRequest, _Sampling, validation_param

if TYPE_CHECKING:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter


async def read_body(request: Request) -> bytes:
    """The body, refused with a 413 past ``max_body_bytes`` (by its Content-Length, or as it arrives)."""
    settings: ServerSettings = request.app.state.settings
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
        raise GoneBeforeBody() from e
    return bytes(body)


def parse(model: type[_Sampling], body: bytes, settings: ServerSettings) -> Any:
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
    if req.model and req.model not in settings.model_names:
        raise APIError(404, f"The model '{req.model}' does not exist (this server has '{settings.model_id}')",
                       param="model", code="model_not_found")
    return req


def chat_request(body: bytes, settings: ServerSettings, formatter: Callable[[], Jinja2ChatFormatter]
                 ) -> tuple[ChatCompletionRequest, list[dict[str, str]], str]:
    """A chat request, its messages and its prompt through the chat template (run in a thread)."""
    req: ChatCompletionRequest = parse(ChatCompletionRequest, body, settings)
    try:
        messages = req.plain_messages()
        prompt = formatter()(messages=cast(Any, messages)).prompt
    except Exception as e:  # noqa: BLE001 (a template that refuses these messages)
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from e
    return req, messages, prompt


def completion_prompt(req: CompletionRequest) -> str:
    """A completion request's prompt, refused if it is not text or empty."""
    try:
        prompt = req.text()
    except ValueError as e:
        raise APIError(400, str(e), param="prompt", code="invalid_value") from e
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
    return prompt


def cache_settings(req: _Sampling, settings: ServerSettings) -> tuple[str, int]:
    """The policy and budget the request's ``infokv`` asks for (the server's by default)."""
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


def request_error(e: Exception, prompt_param: str, settings: ServerSettings) -> APIError:
    """The 400 of an error the request's generation raised about its input."""
    if isinstance(e, PromptTooLongError):
        return APIError(400, f"{e}; this server reads at most {settings.max_prompt_tokens} prompt tokens per "
                             f"request (--max-prompt-tokens)", param=prompt_param,
                        code="context_length_exceeded")
    return APIError(400, str(e), code="invalid_value")
