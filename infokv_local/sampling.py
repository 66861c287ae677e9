"""Sampling through llama.cpp's own sampler chain (llama-cpp-python's bindings), not reimplemented."""

from __future__ import annotations

from dataclasses import dataclass

from llama_cpp import llama_cpp as llama


@dataclass(frozen=True)
class SamplingParams:
    """The usual parameters; ``temperature == 0`` means greedy decoding."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (got {self.min_p})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, 0 disabling it (got {self.top_k})")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0, 1 disabling it (got {self.repeat_penalty})")


class Sampler:
    """A llama.cpp sampler chain built from :class:`SamplingParams`; free it with :meth:`close`."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        self.params = params
        self._chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        add = lambda s: llama.llama_sampler_chain_add(self._chain, s)  # noqa: E731
        p = params
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            add(llama.llama_sampler_init_penalties(n_vocab, p.repeat_last_n, p.repeat_penalty, p.frequency_penalty,
                                                   p.presence_penalty))
        if p.temperature == 0:
            add(llama.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                add(llama.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                add(llama.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0:
                add(llama.llama_sampler_init_min_p(p.min_p, 1))
            add(llama.llama_sampler_init_temp(p.temperature))
            add(llama.llama_sampler_init_dist(p.seed))

    def sample(self, ctx_ptr: llama.llama_context_p, idx: int = -1) -> int:
        """Sample from output row ``idx`` of the context's last decode (and accept the token)."""
        return int(llama.llama_sampler_sample(self._chain, ctx_ptr, idx))

    def accept(self, token: int) -> None:
        """Record a token that was not sampled here (e.g. the prompt) for the repetition penalties."""
        llama.llama_sampler_accept(self._chain, token)

    def close(self) -> None:
        if self._chain is not None:
            llama.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        self.close()
