"""What the server was started with: :class:`ServerSettings`, built by ``serve``'s command line."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import DEFAULTS


@dataclass
class ServerSettings:
    """What the server was started with."""

    model_id: str
    model_path: str
    policy: str
    budget: int
    buffer: int
    kv_bytes_per_cell: int
    memory: str = "dense"  # docs/memory.md
    bounded_bytes_per_slot: int = 0  # the part of a slot's memory that does not grow (sliding window, recurrent)
    prompt_probe: bool = DEFAULTS.prompt_probe
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    max_prompt_tokens: int | None = None  # prompt tokens a request may have to read (None: no limit)
    retry_after_s: int = 2
    model_aliases: tuple[str, ...] = ()
    # the slots share one context: the policy needs its statistics meet (None: each slot has a context of its own)
    shared_statistics: frozenset[str] | None = None

    @property
    def capacity(self) -> int:
        return self.budget + self.buffer

    @property
    def model_names(self) -> frozenset[str]:
        """The names a request's ``model`` may give: the id, the file's path, the aliases."""
        return frozenset({self.model_id, self.model_path, *self.model_aliases})
