"""Sampling through llama.cpp's own sampler chain (llama-cpp-python's bindings), not reimplemented.

One shortcut: greedy decoding with at most a logit bias takes the first largest biased logit itself (what
llama.cpp's greedy sampler picks; tested against the chain), because the chain fills a candidate array of the
whole vocabulary at every step."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from llama_cpp import llama_cpp as llama

if TYPE_CHECKING:
    from .context import StatsContext
    from .model import Model


# llama.cpp's llama_token_data {id, logit, p}, as a numpy record for a whole vocabulary at once
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


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
    grammar: str | None = None  # a GBNF grammar (root rule "root") the output must follow
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit); -inf bans the token

    @staticmethod
    def bias_of(logit_bias: dict[int | str, float] | None, n_vocab: int) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as llama-cpp-python (int keys) or the OpenAI API (token ids as strings) give it."""
        out = []
        for key, value in (logit_bias or {}).items():
            try:
                tok = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias keys are token ids (got {key!r})") from None
            if not 0 <= tok < n_vocab:
                raise ValueError(f"logit_bias token {tok} is outside the vocabulary (0..{n_vocab - 1})")
            bias = float(value)
            if bias != bias or bias == float("inf"):
                raise ValueError(f"logit_bias for token {tok} must be a number or -inf (got {value!r})")
            out.append((tok, bias))
        return tuple(sorted(out))

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
    """A llama.cpp sampler chain built from :class:`SamplingParams`; free it with :meth:`close`.

    The chain is: the logit bias (when given), repetition penalties (when on), the grammar (when given), then greedy or
    top-k / top-p / min-p / temperature / random draw. The grammar needs the model's vocabulary, so
    everything after the penalties is added on the first :meth:`sample`, from the context's model.
    """

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        self.params = params
        self._chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        self._penalties = None
        self._complete = False
        self._candidates: np.ndarray | None = None  # sample_row's candidate array, reused
        p = params
        if p.logit_bias:
            biases = (llama.llama_logit_bias * len(p.logit_bias))(
                *(llama.llama_logit_bias(token=t, bias=b) for t, b in p.logit_bias))
            llama.llama_sampler_chain_add(
                self._chain, llama.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), biases))
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            self._penalties = llama.llama_sampler_init_penalties(n_vocab, p.repeat_last_n, p.repeat_penalty,
                                                                 p.frequency_penalty, p.presence_penalty)
            llama.llama_sampler_chain_add(self._chain, self._penalties)

    def _finish_chain(self, model: Model) -> None:
        add = lambda s: llama.llama_sampler_chain_add(self._chain, s)  # noqa: E731
        p = self.params
        if p.grammar is not None:
            add(grammar_sampler(model, p.grammar))
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
        self._complete = True

    def sample(self, ctx: StatsContext, idx: int = -1) -> int:
        """Sample from output row ``idx`` of the context's last decode (and accept the token)."""
        if self._chain is None:
            raise ValueError("the sampler is closed")
        if not self._complete:
            self._finish_chain(ctx.model)
        if self._greedy_only:  # the row in place, not a copy
            return self._greedy(ctx.logits_view(idx))
        return int(llama.llama_sampler_sample(self._chain, ctx.ptr, idx))

    @property
    def _greedy_only(self) -> bool:
        """Whether the chain is the logit bias (if any) then greedy, with nothing to accept."""
        p = self.params
        return p.temperature == 0 and p.grammar is None and self._penalties is None

    def _greedy(self, logits: np.ndarray) -> int:
        """What the chain of :attr:`_greedy_only` picks: llama.cpp's greedy keeps the first largest (biased)
        logit, as argmax does. This skips the candidate array of the whole vocabulary that the chain fills
        at every step (262,144 entries for Gemma 3)."""
        if self.params.logit_bias:
            logits = logits.copy()
            for token, bias in self.params.logit_bias:
                logits[token] += bias
        return int(np.argmax(logits))

    def sample_row(self, logits: np.ndarray, model: Model) -> int:
        """Sample from a copy of a logits row (and accept the token): what :meth:`sample` does with the
        context's row, as ``llama_sampler_sample`` does it (every token a candidate, unsorted, then the
        chain's ``llama_sampler_apply``), for a sequence whose row another sequence's decode has replaced
        since."""
        if self._chain is None:
            raise ValueError("the sampler is closed")
        if not self._complete:
            self._finish_chain(model)
        if self._greedy_only:
            return self._greedy(logits)
        n = len(logits)
        if self._candidates is None or len(self._candidates) != n:
            self._candidates = np.zeros(n, dtype=_TOKEN_DATA)
        cur = self._candidates
        cur["id"] = np.arange(n, dtype=np.int32)
        cur["logit"] = logits
        cur["p"] = 0.0
        arr = llama.llama_token_data_array(
            data=cur.ctypes.data_as(ctypes.POINTER(llama.llama_token_data)), size=n, selected=-1, sorted=False)
        llama.llama_sampler_apply(self._chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise ValueError("the sampler chain selected no token")
        token = int(arr.data[arr.selected].id)
        llama.llama_sampler_accept(self._chain, token)
        return token

    def accept(self, token: int) -> None:
        """Record a token that was not sampled here (e.g. the prompt) for the repetition penalties
        (only: a grammar constrains what is generated, not the prompt)."""
        if self._penalties is not None:
            llama.llama_sampler_accept(self._penalties, token)

    def close(self) -> None:
        if self._chain is not None:
            llama.llama_sampler_free(self._chain)  # frees the samplers it holds
            self._chain = None
            self._penalties = None

    def __del__(self) -> None:
        self.close()


def grammar_sampler(model: Model, grammar: str) -> llama.llama_sampler_p:
    """llama.cpp's grammar sampler for a GBNF text (root rule ``root``); ``ValueError`` when it does not parse."""
    sampler = llama.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise ValueError("the grammar does not parse (llama.cpp's GBNF parser refused it; its message is in "
                         "llama.cpp's log, shown with --verbose / INFOKV_VERBOSE=1)")
    return sampler


def check_grammar(model: Model, grammar: str) -> None:
    """Raise ``ValueError`` now, before any decoding, if ``grammar`` does not parse."""
    llama.llama_sampler_free(grammar_sampler(model, grammar))
