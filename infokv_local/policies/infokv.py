"""InfoKV (Kai, Xiao, Birch, Lin, 2026, arXiv 2606.26875): keep the tokens that matter for the
distant future as well as the near one.

Per layer l and token i:

    E_i^(l) = (D_i^(l) + tau) * H_i
    S_i^(l) = alpha * A_i^(l) + (1 - alpha) * I_i^(l)

with ``H_i`` the top-k restricted predictive entropy (k = 256 in the paper), ``D_i^(l)`` the
cosine distance between the token's hidden state after layer l and after the last layer, and
``A_i^(l)`` the attention the observation window pays the token. ``mix`` says how the two terms are
put on one scale: "paper" (the paper's and the default: A normalised over tokens, I = softmax_i(E^(l)))
or "rank" (A and E each replaced by their rank among the tokens, scaled to [0, 1], so the score blends
two rankings; the paper's softmax is peaked on a few high-entropy tokens, which makes its mix an
attention ranking with a few tokens forced in). The paper keeps the top tokens per layer; llama.cpp
stores one cell per token for all layers, so the per-layer scores are merged into one ranking:
``merge="mean"`` averages them, ``merge="vote"`` counts in how many layers a token is among the
``n_keep`` best (ties broken by the mean).

Defaults: prompt chunks are compressed with the paper's mix at ``alpha`` 0.95 (measured best of 0.8 / 0.9 /
0.95 with the fidelity benchmark on held-out essays, ``results/sweep-*``; the paper uses 0.9, and 0.95 for some
decode tasks), generation steps with ``decode_mix="rank", decode_alpha=0.5`` (chosen on a selection slice of
GSM8K chain-of-thought traces). The rank mix loses by 24-43% when prompts are compressed (essays, Python's
reference) and the paper's mix loses on the models' own chain-of-thought (Qwen2.5-Coder-0.5B: 1.11-1.14x H2O's
KL, where the rank mix has 0.83-0.89x); split by what triggers the compression, InfoKV had 0.78x the KL of the
paper's mix everywhere on fresh Qwen traces, tied on SmolLM2's, and is the paper's mix on prompts (BENCHMARKS.md).
The paper's method, one mix everywhere at alpha 0.9, is :class:`InfoKVPaperPolicy` (``infokv-paper``); the
default before the split is ``infokv:decode_mix=paper+decode_alpha=0.95``.

Other parameters: ``tau`` (1), ``top_k``,
``entropy`` ("produced": the distribution that produced the token, i.e. the logits one position
earlier; "at": the distribution at the token), ``merge``, and ``kernel_size``/``pooling``: the
attention term pooled over neighbouring tokens as SnapKV does (1 = no pooling).
``stride`` (4; 1: the paper) measures entropy and layer evolution of prompt tokens on every ``stride``-th
token only, interpolating linearly in between, so that llama.cpp computes logits for 1/stride of a
prompt's rows (the LM head is InfoKV's prefill overhead); generated tokens always have their own.
The default 4 was chosen by a rule fixed before its runs, on held-out essays: at most 1.03x the mean KL of
stride 1 on two models and two budgets (measured 1.00-1.02x; BENCHMARKS.md, "The signal stride as the default?").
``decode_mix`` / ``decode_alpha`` (None: ``mix`` / ``alpha``) are the mix and alpha of the compressions that
make room for a single token while the observation window holds mostly generated tokens, i.e. while the model
generates, so that prompt compression and decode-time compression can mix differently. A single token's
compression whose window is mostly the prompt's end (a prompt read whole and compressed when the answer starts,
as SnapKV compresses, or the first tokens of an answer) evicts prompt tokens for the prompt's question, and
uses the prompt's mix; ``decode_on="step"`` gives every one-token compression the decode mix (the rule until
30 Nov 2026: it scored such a prompt compression with the rank mix and kept 2 of a needle's 42 digits where the
prompt's mix keeps 19; decode-time fidelity tied, 0.99x, BENCHMARKS.md).
``redundancy`` (0: off) subtracts R-KV's redundancy term from the information term, ``I - redundancy * R`` with
``I`` scaled by ``1 - redundancy`` (Cai et al., 2025, arXiv 2505.24133; :mod:`.rkv`): per layer, the softmax over
tokens of each key's mean cosine similarity to the other cached keys (ranks under the rank mix), so that of many
tokens saying the same thing fewer are kept. It needs the keys, read from the cache at each compression, so it
is the policy :class:`InfoKVRedundancyPolicy` (``infokv-rkv``, 0.75: chosen on GSM8K 850-949 by a rule written
before the run, benchmarks/notes/2026-12-06-key-policies.md).
``info`` is for ablations: "product" (the paper's E = (D + tau) * H), "entropy" (E = H alone) or
"evolution" (E = D + tau alone); with ``alpha=1`` the policy is attention only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PolicyError
from .base import ATTENTION, ENTROPY, KEYS, LAYER_DIST, Policy, ScoreInput, layer_normalised, require
from .key_similarity import redundancy
from .snapkv import pool1d


def softmax_rows(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def rank_rows(x: np.ndarray) -> np.ndarray:
    """Each row's values replaced by their ranks scaled to [0, 1] (ties share the mean rank)."""
    rows, n = x.shape
    if n < 2:
        return np.zeros_like(x, dtype=np.float64)
    order = np.argsort(x, axis=-1, kind="stable")
    s = np.take_along_axis(x, order, axis=-1)
    j = np.broadcast_to(np.arange(n), (rows, n))
    starts = np.ones((rows, n), dtype=bool)  # the first of a group of equal values
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    ends = np.ones((rows, n), dtype=bool)  # the last of one
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, j, 0), axis=-1)
    last = np.minimum.accumulate(np.where(ends, j, n)[:, ::-1], axis=-1)[:, ::-1]
    ranks = np.empty((rows, n), dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0, axis=-1)
    return ranks / (n - 1)


@dataclass
class InfoKVPolicy(Policy):
    alpha: float = 0.95
    tau: float = 1.0
    top_k: int = 256
    entropy: str = "produced"
    merge: str = "mean"
    kernel_size: int = 1
    pooling: str = "max"
    info: str = "product"
    mix: str = "paper"
    stride: int = 4
    decode_mix: str | None = "rank"
    decode_alpha: float | None = 0.5
    decode_on: str = "window"
    redundancy: float = 0.0
    name = "infokv"
    needs = frozenset({ATTENTION, ENTROPY, LAYER_DIST})

    def __post_init__(self) -> None:
        for field, alpha in (("alpha", self.alpha), ("decode_alpha", self.decode_alpha)):
            if alpha is not None and not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
                raise PolicyError(f"{field} must be a number in [0, 1] (got {alpha!r})")
        if self.tau < 0:
            raise PolicyError(f"tau must be >= 0 (got {self.tau})")
        if self.top_k < 0:
            raise PolicyError(f"top_k must be >= 0, 0 meaning the full vocabulary (got {self.top_k})")
        if self.entropy not in ("produced", "at"):
            raise PolicyError(f"entropy must be 'produced' or 'at' (got {self.entropy!r})")
        if self.merge not in ("mean", "vote"):
            raise PolicyError(f"merge must be 'mean' or 'vote' (got {self.merge!r})")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise PolicyError(f"kernel_size must be a positive odd number (got {self.kernel_size})")
        if self.pooling not in ("max", "avg"):
            raise PolicyError(f"pooling must be 'max' or 'avg' (got {self.pooling!r})")
        for field, mix in (("mix", self.mix), ("decode_mix", self.decode_mix)):
            if mix is not None and mix not in ("paper", "rank"):
                raise PolicyError(f"{field} must be 'paper' or 'rank' (got {mix!r})")
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise PolicyError(f"stride must be a whole number >= 1 (got {self.stride!r})")
        if self.decode_on not in ("window", "step"):
            raise PolicyError(f"decode_on must be 'window' or 'step' (got {self.decode_on!r})")
        if self.info not in ("product", "entropy", "evolution"):
            raise PolicyError(f"info must be 'product', 'entropy' or 'evolution' (got {self.info!r})")
        if not (isinstance(self.redundancy, (int, float)) and 0.0 <= self.redundancy <= 1.0):
            raise PolicyError(f"redundancy must be a number in [0, 1] (got {self.redundancy!r})")
        if self.redundancy > 0 and KEYS not in self.needs:
            raise PolicyError(f"{self.name} does not read the cached keys; the redundancy term is policy "
                              f"'infokv-rkv' (e.g. infokv-rkv:redundancy={self.redundancy})")

    @property
    def entropy_top_k(self) -> int | None:
        return self.top_k

    @property
    def signal_stride(self) -> int:
        return self.stride

    def mix_for(self, inp: ScoreInput) -> tuple[str, float]:
        """The mix and alpha of this compression: the decode ones when it makes room for one generated token,
        i.e. one token while most of the observation window was generated too; a compression that reads the
        end of a prompt (a prompt read whole, the first tokens of an answer) is a prompt compression."""
        if inp.n_incoming == 1 and (self.decode_on == "step" or inp.window_generated > 0.5):
            return self.decode_mix or self.mix, self.alpha if self.decode_alpha is None else self.decode_alpha
        return self.mix, self.alpha

    def layer_scores(self, inp: ScoreInput) -> np.ndarray:
        """S^(l) for every layer: [n_layer, n]."""
        mix, alpha = self.mix_for(inp)
        attn = layer_normalised(require(inp, "attn_window"))
        if self.kernel_size > 1:
            attn = layer_normalised(pool1d(attn, self.kernel_size, self.pooling))
        dist = require(inp, "layer_dist").astype(np.float64)
        h = require(inp, "entropy_produced" if self.entropy == "produced" else "entropy_at").astype(np.float64)
        # a token without a known entropy (the sequence's first) gets the mean, neither kept nor dropped for it
        h = np.where(np.isfinite(h), h, np.nanmean(h) if np.isfinite(h).any() else 0.0)
        dist = np.where(np.isfinite(dist), dist, 0.0)
        if self.info == "entropy":
            energy = np.broadcast_to(h[None, :], dist.shape)
        elif self.info == "evolution":
            energy = dist + self.tau
        else:
            energy = (dist + self.tau) * h[None, :]
        rank = mix == "rank"
        info = rank_rows(energy) if rank else softmax_rows(energy)
        if self.redundancy > 0:
            redundant = redundancy(require(inp, "keys"))
            if redundant.shape[0] != info.shape[0]:  # keys of fewer layers than the statistics: their mean
                redundant = np.broadcast_to(redundant.mean(axis=0), info.shape)
            info = (1.0 - self.redundancy) * info - self.redundancy * (rank_rows(redundant) if rank else redundant)
        return alpha * (rank_rows(attn) if rank else attn) + (1.0 - alpha) * info

    def score(self, inp: ScoreInput) -> np.ndarray:
        per_layer = self.layer_scores(inp)
        mean = per_layer.mean(axis=0)
        if self.merge == "mean" or inp.n_keep >= inp.n:
            return mean
        k = max(inp.n_keep, 1)
        top = np.argpartition(-per_layer, k - 1, axis=1)[:, :k]
        votes = np.bincount(top.ravel(), minlength=inp.n).astype(np.float64)
        return votes + mean / (mean.max() + 1e-30) * 0.5  # mean only breaks ties between equal votes


@dataclass
class InfoKVPaperPolicy(InfoKVPolicy):
    """InfoKV as the paper mixes it: ``alpha`` 0.9, attention normalised over tokens plus a softmax of the
    information term over tokens, the same in every compression (see :class:`InfoKVPolicy`; every parameter can
    still be given), with the statistics of every prompt token (``stride`` 1)."""

    alpha: float = 0.9
    mix: str = "paper"
    stride: int = 1
    decode_mix: str | None = None
    decode_alpha: float | None = None
    name = "infokv-paper"


@dataclass
class InfoKVRedundancyPolicy(InfoKVPolicy):
    """InfoKV with R-KV's redundancy term subtracted from its information term (``redundancy`` 0.75; see
    :class:`InfoKVPolicy`): the cached keys are read at each compression. The default policy
    (:data:`infokv_local.settings.DEFAULTS`), chosen by a rule written before its runs
    (benchmarks/notes/2026-12-07-prompt-forks-and-decode-pressure-300.md)."""

    redundancy: float = 0.75
    name = "infokv-rkv"
    needs = frozenset({ATTENTION, ENTROPY, LAYER_DIST, KEYS})
