"""Prompt building and prefix reuse: which cached tokens a new prompt keeps, and what must be fed."""

from __future__ import annotations

from collections.abc import Sequence

from ..engine import Engine
from ..model import Model, text_bytes
from ..text_stream import token_bytes


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

    def reusable(self, prompt: str, n_cached: int) -> int:
        """How many of the ``n_cached`` tokens of the sequence a request with ``prompt`` would keep (at
        most: tokens after them that were evicted make :meth:`tokens_for` start over); 0 for a prompt
        that is not valid text (its request will say why)."""
        try:
            data = text_bytes(prompt)
        except ValueError:
            return 0
        return self._kept(data, n_cached)[1]

    def tokens_for(self, e: Engine, model: Model, prompt: str, add_bos: bool) -> tuple[list[int], int]:
        """The tokens to feed for ``prompt`` and how many cached tokens are kept as its beginning.

        The cache is kept for the longest run of whole pieces (prompt chunks fed earlier, generated
        tokens) that begins ``prompt``; tokens after that are dropped if still cached, otherwise
        the cache is cleared and the whole prompt is fed.
        """
        data = text_bytes(prompt)  # undecodable input (surrogate-escaped) comes back as its bytes
        kept_bytes, kept_tokens, n_segments = self._kept(data, len(e.tokens))
        if n_segments and e.truncate(kept_tokens):
            del self._segments[n_segments:]
            rest = data[kept_bytes:]
            tokens = model.tokenize(rest, add_special=False, parse_special=True) if rest else []
            self._add_fed(model, rest, tokens)
            return tokens, kept_tokens
        e.reset()
        tokens = model.tokenize(prompt, add_special=add_bos, parse_special=True)
        self._segments = []
        self._add_fed(model, data, tokens)
        return tokens, 0

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
