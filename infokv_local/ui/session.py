"""One browser tab's chat: its settings, its message history and its own InfoKVLlama.

Nothing here imports Gradio: :class:`ChatSession` is plain Python, driven by :mod:`.app`. Every tab
gets its own session (and so its own llama.cpp context) built on the one shared, already loaded
model; the API serialises generation per model, so tabs take turns without corrupting each other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from ..llamacpp.cache_types import check_cache_type, is_quantized
from ..settings import DEFAULTS


class ChatLLM(Protocol):
    """What the UI needs from :class:`infokv_local.InfoKVLlama`."""

    def configure(self, *, policy: str | None = ..., budget: int | None = ..., buffer: int | None = ...,
                  n_sink: int | None = ..., n_recent: int | None = ..., cache_type_k: str | None = ...,
                  cache_type_v: str | None = ..., prompt_probe: bool | None = ...) -> None: ...
    def create_chat_completion(self, messages: list[dict[str, Any]], *, stream: Literal[True],
                               **kwargs: Any) -> Iterator[Mapping[str, Any]]: ...
    def kv_stats(self) -> Mapping[str, Any]: ...
    def cell_history(self) -> list[tuple[int, int]]: ...
    def cache_map(self) -> Any: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Settings:
    """The controls of the chat; a change applies to the next message. The cache's defaults are
    :data:`infokv_local.settings.DEFAULTS` (shared with the API and the command line)."""

    policy: str = DEFAULTS.policy
    budget: int = DEFAULTS.budget
    buffer: int = DEFAULTS.buffer
    temperature: float = 0.7
    max_tokens: int = 512
    n_sink: int = DEFAULTS.n_sink
    n_recent: int = DEFAULTS.n_recent
    cache_type: str = DEFAULTS.cache_type_k  # K and V alike: f16, q8_0, q4_0
    prompt_probe: bool = DEFAULTS.prompt_probe  # a message longer than the cache: its end read first

    @property
    def min_budget(self) -> int:
        """The smallest budget the engine accepts: the sinks, the protected recent tokens and one more."""
        return self.n_sink + self.n_recent + 1

    def check(self) -> None:
        """Raise ``ValueError`` with a message for the user when a setting cannot be used."""
        from ..policies import POLICIES

        if self.policy.split(":")[0] not in POLICIES:
            raise ValueError(f"Unknown policy {self.policy!r}: choose one of {', '.join(POLICIES)}.")
        if self.budget < self.min_budget:
            raise ValueError(
                f"Budget {self.budget} is too small: it must be at least {self.min_budget} tokens "
                f"({self.n_sink} sink + {self.n_recent} recent tokens are never evicted, plus one)."
            )
        if self.buffer < 1:
            raise ValueError(f"Buffer {self.buffer} must be at least 1 token.")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"Temperature {self.temperature} must be between 0 and 5.")
        if self.max_tokens < 1:
            raise ValueError(f"Max tokens {self.max_tokens} must be at least 1.")
        check_cache_type(self.cache_type, "KV cache type")
        if is_quantized(self.cache_type) and self.policy.split(":")[0] == "h2o":
            raise ValueError(f"Policy h2o needs flash attention off, and a {self.cache_type} cache needs it on: "
                             f"choose f16 for h2o, or another policy.")

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``InfoKVLlama(...)`` and ``.configure(...)``."""
        d = asdict(self)
        return {**{k: d[k] for k in ("policy", "budget", "buffer", "n_sink", "n_recent", "prompt_probe")},
                "cache_type_k": self.cache_type, "cache_type_v": self.cache_type}


@dataclass
class ReplyUpdate:
    """The state of the answer being generated, after one chunk of the stream."""

    text: str
    kv: dict[str, Any]
    done: bool = False
    finish_reason: str | None = None


@dataclass
class ChatSession:
    """A conversation and the InfoKVLlama that holds its compressed KV cache.

    ``factory(settings)`` builds the InfoKVLlama (lazily, on the first message, so an idle tab holds no
    llama.cpp context). ``stop()`` may be called from any thread: the running reply notices it at the
    next token, closes the stream (which leaves the cache consistent) and returns.
    """

    factory: Callable[[Settings], ChatLLM]
    settings: Settings = field(default_factory=Settings)
    system_prompt: str = ""
    history: list[dict[str, str]] = field(default_factory=list)
    llm: ChatLLM | None = None
    applied: Settings | None = None
    pending: tuple[str, Settings, str] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False

    # -- control, from any thread ------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether a reply is being generated (or about to be)."""
        return self._lock.locked()

    def stop(self) -> None:
        """Ask the running reply, if any, to stop at its next token."""
        self._stop.set()

    def submit(self, message: str, settings: Settings, system_prompt: str) -> None:
        """Queue a user message for :meth:`reply` (settings checked first: ``ValueError`` keeps nothing queued)."""
        settings.check()
        self._stop.clear()
        self.pending = (message, settings, system_prompt)

    def regenerate(self, settings: Settings, system_prompt: str) -> str:
        """Queue the last user message again, its answer dropped, for :meth:`reply`; returns the message. The
        API keeps the cache up to that message's last token (on a sliding-window or hybrid model through a
        checkpoint), so only the answer is generated again. ``ValueError`` (nothing changes) when the settings
        cannot be used or no message was sent yet."""
        settings.check()
        last = next((i for i in range(len(self.history) - 1, -1, -1) if self.history[i]["role"] == "user"), None)
        if last is None:
            raise ValueError("Nothing to regenerate yet: send a message first.")
        message = self.history[last]["content"]
        del self.history[last:]
        self._stop.clear()
        self.pending = (message, settings, system_prompt)
        return message

    def new_chat(self, timeout: float = 10.0) -> bool:
        """Stop any reply and forget the conversation; False if the running reply did not end in time."""
        self._stop.set()
        if not self._lock.acquire(timeout=timeout):
            return False
        try:
            self.history.clear()
            self.pending = None
            if self.llm is not None:
                self.llm.reset()
        finally:
            self._lock.release()
        return True

    def close(self) -> None:
        """Release the llama.cpp context (the tab was closed); a running reply releases it when it ends."""
        self._closed = True
        self._stop.set()
        self._release_if_idle()

    def _release_if_idle(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # the running reply calls this again when it has released the lock
        try:
            if self._closed and self.llm is not None:
                self.llm.close()
                self.llm = None
                self.applied = None
        finally:
            self._lock.release()

    # -- the reply -------------------------------------------------------------------------------
    def messages(self, system_prompt: str) -> list[dict[str, str]]:
        """The full message list sent to the model: the system prompt, then the history."""
        head = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        return head + list(self.history)

    def _ensure_llm(self, settings: Settings) -> ChatLLM:
        if self.llm is None:
            self.llm = self.factory(settings)
            self.applied = settings
        elif self.applied is None or settings.engine_kwargs() != self.applied.engine_kwargs():
            self.llm.configure(**settings.engine_kwargs())
            self.applied = settings
        return self.llm

    def reply(self) -> Iterator[ReplyUpdate]:
        """Generate the answer to the pending message, yielding after every chunk of the stream.

        The session lock is held until the generator is finished or closed, so :meth:`new_chat`
        waits for the last update to be delivered before clearing the conversation.
        """
        if self.pending is None:
            return
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this chat is already answering; press Stop first")
        self._closed = False
        try:
            message, settings, system_prompt = self.pending
            self.pending = None
            self.settings = settings
            self.system_prompt = system_prompt
            llm = self._ensure_llm(settings)
            self.history.append({"role": "user", "content": message})
            text, finish = "", None
            kv: dict[str, Any] = dict(llm.kv_stats())
            if not self._stop.is_set():
                stream = llm.create_chat_completion(
                    messages=self.messages(system_prompt), max_tokens=settings.max_tokens,
                    temperature=settings.temperature, stream=True,
                )
                try:
                    for chunk in stream:
                        choice = chunk["choices"][0]
                        text += choice["delta"].get("content", "") or ""
                        finish = choice.get("finish_reason")
                        kv = chunk.get("kv", kv)
                        if self._stop.is_set():
                            finish = "stopped"
                            break
                        yield ReplyUpdate(text, kv)
                finally:
                    close = getattr(stream, "close", None)
                    if close is not None:
                        close()
                    if text:
                        self.history.append({"role": "assistant", "content": text})
            else:
                finish = "stopped"
            # the stream's last kv block has the speed; kv_stats() has the state after the stream closed
            yield ReplyUpdate(text, {**kv, **llm.kv_stats()}, done=True, finish_reason=finish or "stop")
        finally:
            self._lock.release()
            if self._closed:
                self._release_if_idle()


class SessionRegistry:
    """The open sessions by Gradio session hash, so a closed tab's context is released at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, ChatSession] = {}

    def add(self, key: str, session: ChatSession) -> None:
        """Remember the session of a tab."""
        with self._lock:
            self._sessions[key] = session

    def close(self, key: str) -> bool:
        """Close and forget the session of a tab that was closed; False if there was none."""
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is None:
            return False
        session.close()
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def monotonic_throttle(interval: float) -> Callable[[bool], bool]:
    """A function ``due(force)`` that is True at most every ``interval`` seconds (always when forced)."""
    last = [-1e9]

    def due(force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - last[0] >= interval:
            last[0] = now
            return True
        return False

    return due
