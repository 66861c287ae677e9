"""Similarities among cached keys, for the policies that score tokens by their keys (no attention needed).

``keys`` is [layers, n tokens, KV heads, head size]; every function returns one row per layer, each KV head's
values averaged (llama.cpp keeps one cell per token for every layer and head, so a token is kept or evicted
whole).
"""

from __future__ import annotations

import numpy as np


def unit(keys: np.ndarray) -> np.ndarray:
    """Keys scaled to length 1 (a zero key stays zero), as float64."""
    k = keys.astype(np.float64)
    norm = np.linalg.norm(k, axis=-1, keepdims=True)
    return np.divide(k, norm, out=np.zeros_like(k), where=norm > 0)


def anchor_similarity(keys: np.ndarray) -> np.ndarray:
    """[layers, n]: the cosine similarity of each token's key to the anchor, the mean of the unit keys of its
    layer and head (KeyDiff's measure: a key far from the anchor is distinctive)."""
    u = unit(keys)
    anchor = u.mean(axis=1, keepdims=True)  # [L, 1, H, d]
    a_norm = np.linalg.norm(anchor, axis=-1)  # [L, 1, H]
    dots = (u * anchor).sum(axis=-1)  # [L, n, H]
    cos = np.divide(dots, a_norm, out=np.zeros_like(dots), where=a_norm > 0)
    return cos.mean(axis=-1)


def mean_similarity(keys: np.ndarray) -> np.ndarray:
    """[layers, heads, n]: each key's mean cosine similarity to the other tokens' keys of its layer and head.

    The mean over the others of u_i . u_j is (u_i . sum_j u_j - |u_i|^2) / (n - 1): one pass over the keys,
    the same numbers as the similarity matrix with its diagonal zeroed, without building it."""
    u = unit(keys)
    n = u.shape[1]
    if n < 2:
        return np.zeros((u.shape[0], u.shape[2], n))
    total = u.sum(axis=1, keepdims=True)  # [L, 1, H, d]
    self_sq = (u * u).sum(axis=-1)  # 1, or 0 for a zero key
    return np.moveaxis(((u * total).sum(axis=-1) - self_sq) / (n - 1), 1, 2)


def redundancy(keys: np.ndarray) -> np.ndarray:
    """[layers, n]: R-KV's redundancy: per layer and head, the softmax over tokens of each key's mean cosine
    similarity to the others (a key like many others is redundant), averaged over the heads."""
    sim = mean_similarity(keys)
    z = np.exp(sim - sim.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).mean(axis=1)
