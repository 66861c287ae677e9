"""What every eviction policy shares: the scoring input and the small Policy interface.

Modelled on NVIDIA kvpress's presses: a policy is a tiny documented class whose only job is to
turn signals into one importance score per cached token (higher = keep). The engine alone decides
how many tokens to keep, protects the sink and recent tokens, and talks to llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

ATTENTION = "attention"
# attention accumulated over every query row (H2O), not only the observation window: it exists only
# in the explicit softmax, so a policy that needs it runs with flash attention off
ATTENTION_ALL_ROWS = "attention_all_rows"
ENTROPY = "entropy"
LAYER_DIST = "layer_dist"
# the cached keys (after RoPE), read from the cache at each compression (KeyDiff, R-KV)
KEYS = "keys"


@dataclass
class ScoreInput:
    """Signals of the evictable cached tokens, one column per token, ordered by position.

    - ``positions`` [n]
    - ``attn_acc`` [n_layer, n]: attention each token received since it entered the cache (summed over
      heads and every query since), the H2O signal
    - ``attn_window`` [n_layer, n]: attention from the last ``window_rows`` queries (SnapKV's
      observation window), summed over heads and those queries
    - ``attn_current`` [n_layer, n]: attention from the newest query alone (TOVA)
    - ``entropy_produced`` / ``entropy_at`` [n]: top-k predictive entropy of the distribution that
      produced the token / at the token
    - ``layer_dist`` [n_layer, n]: 1 - cos(layer l's output, last layer's output) for the token
    - ``keys`` [n_key_layer, n, n_head_kv, head_dim]: the tokens' cached keys (after RoPE), for the layers that
      hold their own keys in the evicted cache
    - ``n_keep``: how many of these tokens the engine will keep (for policies that vote)
    - ``n_incoming``: how many tokens the compression makes room for: 1 for a generation step (or text
      teacher-forced one token at a time), more for a prompt chunk
    - ``window_generated``: the share of the observation window's queries (the last tokens decoded) that
      were decoded one at a time: 0 when one token's compression reads the end of a prompt (a prompt read
      whole and compressed once, or the first tokens of an answer), 1 while generating
    """

    positions: np.ndarray
    n_keep: int
    n_incoming: int = 1
    window_generated: float = 1.0
    window_rows: int = 0
    attn_acc: np.ndarray | None = None
    attn_window: np.ndarray | None = None
    attn_current: np.ndarray | None = None
    entropy_produced: np.ndarray | None = None
    entropy_at: np.ndarray | None = None
    layer_dist: np.ndarray | None = None
    keys: np.ndarray | None = None
    rng: np.random.Generator | None = None

    @property
    def n(self) -> int:
        return int(self.positions.shape[0])


class Policy:
    """Base class: subclasses set ``name``, ``needs`` and implement :meth:`score`."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    evicts: ClassVar[bool] = True
    # every policy's option (``"tova:whole_numbers=1"``): the engine gives all tokens of a written number the
    # score of its best token, so a number is kept or evicted whole rather than losing some of its digits
    whole_numbers: bool = False
    # every policy's option (``"infokv-rkv:keep_prompt=1"``): tokens read as a prompt (in chunks, not generated one
    # at a time) rank above every generated token, so the question is evicted only when it alone overflows the
    # budget, and then in the policy's own order
    keep_prompt: bool = False

    def score(self, inp: ScoreInput) -> np.ndarray:
        raise NotImplementedError

    def n_keep(self, n_evictable: int, target: int) -> int:
        """How many of ``n_evictable`` tokens to keep when the engine asks for ``target``."""
        return target

    @property
    def entropy_top_k(self) -> int | None:
        """k of the restricted entropy this policy wants computed (None: no entropy)."""
        return None

    @property
    def signal_stride(self) -> int:
        """k: the per-token signals (entropy, layer evolution) of a prompt are measured on every k-th token
        and interpolated in between (1: every token)."""
        return 1


def require(inp: ScoreInput, field: str) -> np.ndarray:
    value = getattr(inp, field)
    if value is None:
        raise ValueError(f"this policy needs the '{field}' signal, which the engine did not collect")
    return value


def layer_normalised(x: np.ndarray) -> np.ndarray:
    """Each layer's row divided by its sum (rows of zeros stay zero)."""
    s = x.sum(axis=-1, keepdims=True)
    return np.divide(x, s, out=np.zeros_like(x, dtype=np.float64), where=s > 0)
