"""Prompt building and prefix reuse: which cached tokens a new prompt keeps, and what must be fed."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..engine import Engine
from ..llamacpp.model import Model, text_bytes
from .text_stream import token_bytes


def utf8_of(text: str, what: str) -> bytes:
    """``text`` as UTF-8; a lone surrogate (e.g. undecodable bytes passed through ``surrogateescape``)
    is a ``ValueError`` saying which input and where, not a codec error about this package."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = text[e.start]
        hint = f" (the undecodable byte {ord(ch) - 0xDC00:#04x}?)" if 0xDC80 <= ord(ch) <= 0xDCFF else ""
        raise ValueError(
            f"the {what} is not valid UTF-8 text: character {e.start} is a lone surrogate {ch!r}{hint}; "
            f"pass text, or bytes that decode as UTF-8"
        ) from None


def text_of(value: str | bytes, what: str) -> str:
    """A prompt or a stop given as ``str`` or UTF-8 ``bytes``, checked."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"the {what} is not valid UTF-8: byte {e.start} ({value[e.start]:#04x}) "
                             f"{e.reason}") from None
    if not isinstance(value, str):
        raise TypeError(f"the {what} must be a str or bytes (got {type(value).__name__})")
    utf8_of(value, what)
    return value


def prompt_of(value: str | bytes) -> str:
    """A prompt given as ``str`` or ``bytes``, read as llama.cpp's tokenizer reads bytes: undecodable
    bytes are kept (as the surrogate escapes Python uses for them, turned back into the same bytes when
    tokenized); a lone surrogate that stands for no byte is an :class:`~infokv_local.errors.InvalidTextError`."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if not isinstance(value, str):
        raise TypeError(f"the prompt must be a str or bytes (got {type(value).__name__})")
    text_bytes(value)  # raises on a surrogate that stands for no byte
    return value


@dataclass
class PromptPlan:
    """What a request does with the cache before it generates (:meth:`PromptCache.plan`): keep the first
    ``kept_tokens`` cached tokens (the first ``kept_segments`` pieces; 0: start over), then feed ``tokens``,
    the tokens of ``data``."""

    kept_tokens: int
    kept_segments: int
    data: bytes
    tokens: list[int]


class PromptCache:
    """The sequence's text as (bytes, n_tokens) pieces: prompt chunks fed and generated tokens.

    A new prompt keeps the cache for the longest run of whole pieces it begins with.
    """

    def __init__(self) -> None:
        self._segments: list[tuple[bytes, int]] = []

    def clear(self) -> None:
        self._segments = []

    def segments(self) -> list[tuple[bytes, int]]:
        """A copy of the pieces (to park a conversation)."""
        return list(self._segments)

    def restore(self, segments: list[tuple[bytes, int]]) -> None:
        self._segments = list(segments)

    def add_generated(self, model: Model, tokens: Sequence[int]) -> None:
        self._segments.extend((token_bytes(model, t), 1) for t in tokens)

    def _kept(self, data: bytes, n_cached: int) -> tuple[int, int, int]:
        """Bytes, tokens and pieces of the cached sequence that a prompt of ``data`` keeps."""
        kept_bytes = kept_tokens = n_segments = 0
        if sum(n for _, n in self._segments) == n_cached:
            for seg, n in self._segments:
                if not data.startswith(seg, kept_bytes):
                    break
                kept_bytes += len(seg)
                kept_tokens += n
                n_segments += 1
        # something must be fed after a truncation (its logits are gone), and the rest must start a character
        while n_segments and ((kept_tokens < n_cached and kept_bytes == len(data))
                              or (kept_bytes < len(data) and data[kept_bytes] & 0xC0 == 0x80)):
            n_segments -= 1
            seg, n = self._segments[n_segments]
            kept_bytes -= len(seg)
            kept_tokens -= n
        return kept_bytes, kept_tokens, n_segments

    def _checkpoint_kept(self, data: bytes, kept_tokens: int, points: list[int]) -> tuple[int, int, int]:
        """Bytes, tokens and pieces kept when the cache goes back to the newest checkpoint (``points``: the
        engine's, token counts) before ``kept_tokens`` that ends a piece: a memory with a bounded part
        cannot drop its newest tokens otherwise; (0, 0, 0) when there is none."""
        ends: dict[int, tuple[int, int]] = {}  # tokens -> (bytes, pieces) at each piece's end
        n_bytes = n_tokens = 0
        for i, (seg, n) in enumerate(self._segments):
            if n_tokens >= kept_tokens:
                break
            n_bytes += len(seg)
            n_tokens += n
            ends[n_tokens] = (n_bytes, i + 1)
        for point in sorted(points, reverse=True):
            if 0 < point < kept_tokens and point in ends:
                b, pieces = ends[point]
                if b < len(data) and data[b] & 0xC0 != 0x80:  # something to feed, starting a character
                    return b, point, pieces
        return 0, 0, 0

    def reusable(self, prompt: str | bytes, n_cached: int) -> int:
        """How many of the ``n_cached`` tokens of the sequence a request with ``prompt`` (text, or its UTF-8
        bytes from :func:`~infokv_local.llamacpp.model.text_bytes`) would keep (at most: tokens after them that were
        evicted make :meth:`plan` start over); 0 for a prompt that is not valid text (its request will say why)."""
        if isinstance(prompt, str):
            try:
                prompt = text_bytes(prompt)
            except ValueError:
                return 0
        return self._kept(prompt, n_cached)[1]

    def plan(self, e: Engine, model: Model, prompt: str, add_bos: bool, limit: int | None = None,
             cancel: threading.Event | None = None,
             lock: contextlib.AbstractContextManager[Any] | None = None) -> PromptPlan:
        """What a request with ``prompt`` keeps of the cache and what it feeds; changes nothing.

        The cache is kept for the longest run of whole pieces (prompt chunks fed earlier, generated
        tokens) that begins ``prompt``, when every cached token after them can be dropped; otherwise
        the whole prompt is fed after a reset. ``limit``: the most tokens the request may feed
        (:class:`~infokv_local.errors.PromptTooLongError` beyond, found without tokenizing all of a huge
        prompt); ``cancel`` stops the tokenizing (:class:`~infokv_local.errors.RequestCancelled`).
        ``lock`` is taken to read the engine's cells (not while tokenizing).
        """
        data = text_bytes(prompt)  # undecodable input (surrogate-escaped) comes back as its bytes
        kept_bytes, kept_tokens, n_segments = self._kept(data, len(e.tokens))
        if n_segments:
            with lock or contextlib.nullcontext():
                if not e.can_truncate(kept_tokens):
                    kept_bytes, kept_tokens, n_segments = self._checkpoint_kept(data, kept_tokens,
                                                                                e.checkpoint_points())
        if n_segments:
            data, add_special, kept = data[kept_bytes:], False, (kept_tokens, n_segments)
        else:
            add_special, kept = add_bos, (0, 0)
        if not data and not add_special:
            tokens: list[int] = []
        elif limit is None:
            tokens = model.tokenize(data, add_special=add_special, parse_special=True)
        else:
            what = "the part of the prompt not cached" if n_segments else "the prompt"
            tokens = model.tokenize_bounded(data, limit, add_special=add_special, parse_special=True, cancel=cancel,
                                            what=what)
        return PromptPlan(kept_tokens=kept[0], kept_segments=kept[1], data=data, tokens=tokens)

    def apply(self, e: Engine, plan: PromptPlan) -> None:
        """Drop what ``plan`` does not keep: the engine is truncated to the kept tokens (or reset)."""
        if plan.kept_segments:
            if not e.truncate(plan.kept_tokens):
                raise RuntimeError("the cache changed between planning and applying a prompt")
            del self._segments[plan.kept_segments:]
        else:
            e.reset()
            self._segments = []

    def add_fed(self, model: Model, plan: PromptPlan, n_fed: int) -> None:
        """Record the first ``n_fed`` of ``plan``'s tokens as read (all of them, or fewer when the reading
        stopped part way: then as one piece of the bytes they print, when ``plan.data`` begins with those;
        otherwise the pieces no longer add up to the sequence and the next prompt starts over)."""
        tokens = plan.tokens
        if n_fed == len(tokens):
            self._add_fed(model, plan.data, tokens)
            return
        if n_fed == 0:
            return
        start = 1 if tokens[0] == model.bos_token_id and not plan.kept_segments else 0
        fed = b"".join(token_bytes(model, t, special=True) for t in tokens[start:n_fed])
        if not plan.data.startswith(fed) and fed[:1] == b" " and plan.data.startswith(fed[1:]):
            fed = fed[1:]  # SentencePiece's space before the first word, which the text does not have
        if plan.data.startswith(fed):
            self._segments.append((fed, n_fed))
        else:
            self._segments = []

    def _add_fed(self, model: Model, data: bytes, tokens: list[int]) -> None:
        """Record a fed prompt chunk as two pieces, its last token apart, so that the same prompt again
        (a regenerated answer) keeps all of it but that token, which is fed again for its logits."""
        if not data:
            return
        last = token_bytes(model, tokens[-1], special=True) if len(tokens) > 1 else b""
        if last and len(last) < len(data) and data.endswith(last):
            self._segments += [(data[: -len(last)], len(tokens) - 1), (last, 1)]
        else:
            self._segments.append((data, len(tokens)))
