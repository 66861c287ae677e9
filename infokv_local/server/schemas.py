"""Pydantic models of the requests (OpenAI's fields, plus the ``infokv`` extension) and of errors.

Unknown fields are accepted and ignored (other local servers' extensions such as
``chat_template_kwargs`` or ``cache_prompt`` must not be fatal); known fields are validated.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class InfoKVOptions(BaseModel):
    """Per-request cache settings. Changing them rebuilds the slot's cache (the prompt is prefilled)."""

    model_config = ConfigDict(extra="forbid")
    policy: str | None = Field(None, description="eviction policy, e.g. 'h2o' or 'infokv:alpha=0.9'")
    budget: int | None = Field(None, ge=1, description="KV budget in tokens, at most the server's")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id -> bias in [-100, 100], as OpenAI's")
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    infokv: InfoKVOptions | None = None

    @model_validator(mode="after")
    def _stops(self) -> _Sampling:
        if self.stop == "" or (isinstance(self.stop, list) and any(not s for s in self.stop)):
            raise ValueError("stop sequences must not be empty")
        return self

    def sampling_kwargs(self, default_temperature: float) -> dict[str, Any]:
        """Keyword arguments of ``create_(chat_)completion``."""
        kw: dict[str, Any] = dict(
            temperature=default_temperature if self.temperature is None else self.temperature,
            stop=self.stop, seed=self.seed, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=self.logit_bias,
        )
        for key in ("top_p", "top_k", "min_p", "repeat_penalty"):
            value = getattr(self, key)
            if value is not None:
                kw[key] = value
        return kw


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message as text (text parts joined); other kinds of parts are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        out = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported (text only)")
            out.append(part.text)
        return "".join(out)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("give one prompt per request")
        return self.prompt[0]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def validation_param(err: ValidationError) -> tuple[str, str | None]:
    """A readable message and OpenAI's ``param`` (dotted path) for the first validation error."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "str", "list["))]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param
