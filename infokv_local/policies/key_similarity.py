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
    out = np.zeros(keys.shape[:2])
    for layer, k in enumerate(keys):  # a layer at a time: the float64 copies stay one layer's size
        u = unit(k)  # [n, H, d]
        anchor = u.mean(axis=0)  # [H, d]
        a_norm = np.linalg.norm(anchor, axis=-1)  # [H]
        inv = np.divide(1.0, a_norm, out=np.zeros_like(a_norm), where=a_norm > 0)
        out[layer] = np.einsum("nhd,hd->nh", u, anchor * inv[:, None]).mean(axis=-1)
    return out


def mean_similarity(keys: np.ndarray) -> np.ndarray:
    """[layers, heads, n]: each key's mean cosine similarity to the other tokens' keys of its layer and head.

    The mean over the others of u_i . u_j is (u_i . sum_j u_j - |u_i|^2) / (n - 1): one pass over the keys,
    the same numbers as the similarity matrix with its diagonal zeroed, without building it."""
    n_layers, n, n_heads, _ = keys.shape
    out = np.zeros((n_layers, n_heads, n))
    if n < 2:
        return out
    for layer, k in enumerate(keys):  # a layer at a time, as above
        u = unit(k)
        total = u.sum(axis=0)  # [H, d]
        self_sq = np.einsum("nhd,nhd->hn", u, u)  # 1, or 0 for a zero key
        out[layer] = (np.einsum("nhd,hd->hn", u, total) - self_sq) / (n - 1)
    return out


def redundancy(keys: np.ndarray) -> np.ndarray:
    """[layers, n]: R-KV's redundancy: per layer and head, the softmax over tokens of each key's mean cosine
    similarity to the others (a key like many others is redundant), averaged over the heads."""
    sim = mean_similarity(keys)
    z = np.exp(sim - sim.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).mean(axis=1)
