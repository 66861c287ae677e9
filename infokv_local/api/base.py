"""What the parts of :class:`~infokv_local.api.InfoKVLlama` share: the model, its lock, the engine."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import Engine, FairRLock
from ..llamacpp.model import Model
from .prompt import PromptCache


@dataclass
class _Run:
    """Book-keeping of one request."""

    prompt_tokens: int
    reused_tokens: int
    first_step: int
    t_start: float
    t_first: float | None = None
    completion_tokens: int = 0
    max_used_cells: int = 0


class LlamaBase:
    """The state every part works on (set up by :class:`~infokv_local.api.llama.InfoKVLlama`)."""

    model: Model
    model_path: str
    seed: int
    _calls: int
    _lock: FairRLock  # the model's lock: one llama.cpp call at a time on the model
    _engine: Engine | None
    _prompt: PromptCache  # the sequence's text, piece by piece, for prefix reuse
    _active: bool  # a request's chunks are being read

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise ValueError("this InfoKVLlama is closed")
        return self._engine

    def _refuse_while_streaming(self, what: str) -> None:
        if self._active:
            raise RuntimeError(f"a streamed completion is still open on this InfoKVLlama: read it to the end or "
                               f"close() it before {what}")
