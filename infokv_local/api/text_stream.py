"""Turning sampled tokens into text: UTF-8 pieces and stop strings, for streaming."""

from __future__ import annotations

from collections.abc import Sequence

from ..llamacpp.model import Model


def token_bytes(model: Model, token: int, special: bool = False) -> bytes:
    """The bytes llama.cpp prints for one token (:meth:`~infokv_local.llamacpp.model.Model.token_bytes`)."""
    return model.token_bytes(token, special)


class Utf8Pieces:
    """Accumulates token bytes and releases text only at whole UTF-8 characters."""

    def __init__(self) -> None:
        self._pending = b""

    def push(self, data: bytes) -> str:
        self._pending += data
        try:
            text = self._pending.decode("utf-8")
        except UnicodeDecodeError as e:
            if len(self._pending) - e.start < 4 and e.reason == "unexpected end of data":
                text = self._pending[: e.start].decode("utf-8")
                self._pending = self._pending[e.start :]
                return text
            text = self._pending.decode("utf-8", "replace")
        self._pending = b""
        return text

    def flush(self) -> str:
        text, self._pending = self._pending.decode("utf-8", "replace"), b""
        return text


class StopMatcher:
    """Holds back text that may be the start of a stop string; cuts the text at the first stop string.

    ``push(text)`` returns ``(releasable_text, stopped)``; after a stop, the stop string and
    everything after it are never released.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        held = self._held + text
        cut = min((i for i in (held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return held[:cut], True
        keep = 0
        for s in self.stops:  # the longest tail of ``held`` that begins some stop string
            for k in range(min(len(s) - 1, len(held)), keep, -1):
                if held.endswith(s[:k]):
                    keep = k
                    break
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text
