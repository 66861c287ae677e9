"""The one set of defaults for loading a model and sizing its KV cache, shared by every surface.

``InfoKVLlama``'s keyword defaults, the command line's options (``generate``, ``chat``, ``batch``),
the chat UI and the throughput benchmark all read :data:`DEFAULTS`, so a budget means the same thing
wherever it is left out.

Why these values: ``budget=256`` + ``buffer=64`` is what the command line, the chat UI, the batch
runner and the throughput benchmark (``results/throughput-smollm2.json``) already used; only the
Python API differed (1024 + 128). 256 + 64 cells is small enough that eviction is visible on the
short prompts of the demo and the chat (a 1024-token budget never evicts in a short chat, so the
point of the package would not show), keeps the attended window at 320 cells (decode 1.1-1.35x
llama-cpp-python's full cache in the throughput table) and takes under 10 MiB of KV memory for the
1.5B demo model. Long documents want more: pass ``budget`` (or ``budget_mib``). ``n_sink=4``
(StreamingLLM's attention sinks), ``n_recent=32`` and ``window=32`` (SnapKV's observation window)
are the values the fidelity benchmark measured. ``n_threads=None`` means the physical cores this
process may use (:func:`~infokv_local.llamacpp.threads.default_threads`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Settings:
    """How to load a model and size its KV cache. Sampling parameters are per request, not here."""

    policy: str = "infokv-rkv"  # a policy name, parameters as "infokv-rkv:redundancy=0.5"
    budget: int = 256  # tokens the cache is compressed to (ignored when budget_mib is given)
    budget_mib: float | None = None  # the budget in MiB of KV memory instead of tokens
    buffer: int = 64  # tokens the cache may grow past the budget before the next compression
    n_sink: int = 4  # first tokens, never evicted
    n_recent: int = 32  # last tokens, never evicted
    window: int = 32  # recent queries whose attention forms the observation window
    n_batch: int = 512  # largest prompt chunk per decode call (also capped by the buffer)
    n_threads: int | None = None  # None: the physical cores this process may use
    n_gpu_layers: int = 0  # layers offloaded to the GPU in a GPU build (with rpc servers and 0: all layers)
    seed: int = 0  # the random policy's and the sampler's base seed
    n_ctx: int | None = None  # context of the non-evicting "full" policy (None: the model's trained context)
    # None: on a CPU the fastest of on, off and "split" (on for prompts, off for one-token steps), timed once per
    # model, machine and cache size (llama.cpp's auto on a GPU)
    flash_attn: bool | str | None = None
    cache_type_k: str = "f16"  # KV cache data types (q8_0, q4_0...: a quantized V cache needs flash attention)
    cache_type_v: str = "f16"
    prompt_probe: bool = True  # read the prompt's end ahead before each compression of a prompt (Engine)
    max_checkpoints: int = 4  # saved states of a sliding-window or hybrid memory's bounded part per sequence (0: none)
    rpc: tuple[str, ...] = ()  # llama.cpp RPC servers ("host:port") whose devices take the offloaded layers
    parallel: int = 8  # prompts decoded together by create_completions and batch (see docs/benchmarks.md)

    @property
    def min_budget(self) -> int:
        """The smallest budget an evicting policy accepts: the sinks, the recent tokens and one more."""
        return self.n_sink + self.n_recent + 1

    def with_(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied, ``None`` values ignored (an option left out keeps its default)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``InfoKVLlama(...)``."""
        return asdict(self)


DEFAULTS = Settings()

__all__ = ["DEFAULTS", "Settings"]
