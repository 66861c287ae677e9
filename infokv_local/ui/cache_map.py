"""The cache map: every token of the conversation, coloured by whether it is still in the KV cache
and by its policy score; evicted tokens are greyed and struck through.

Rendered as HTML for ``gr.HTML``; the look lives in ``static/ui.css`` (classes ``tok``, ``kept``,
``gone``, ``prot``, ``pending``, ``s0``..``s4``).
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

#: Score classes: kept tokens are ranked by policy score among the scored kept tokens, in this many bins.
N_LEVELS = 5


def _score_levels(score: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rank-based level 0..N_LEVELS-1 for the tokens in ``mask`` with a finite score; -1 elsewhere."""
    levels = np.full(score.shape, -1, dtype=np.int64)
    ok = mask & np.isfinite(score)
    n = int(ok.sum())
    if n == 0:
        return levels
    ranks = np.empty(n, dtype=np.int64)
    ranks[np.argsort(score[ok], kind="stable")] = np.arange(n)
    # the lowest score gets level 0, the highest N_LEVELS - 1, evenly by rank in between
    levels[ok] = np.rint(ranks * (N_LEVELS - 1) / max(n - 1, 1)).astype(np.int64) if n > 1 else N_LEVELS - 1
    return levels


def _piece_html(piece: str) -> str:
    text = html.escape(piece)
    if piece == "":
        return "\u200b"
    if "\n" in piece and piece.strip() == "":
        # a newline token: show a visible mark, then break the line
        return "\u21b5" * piece.count("\n") + "\n"
    return text


def render_cache_map(cmap: Any | None, max_tokens: int = 3000) -> str:
    """HTML for a ``CacheMap`` (``pieces``, ``in_cache``, ``score``, ``protected``, ``evicted``); an empty map if
    None.

    Only the last ``max_tokens`` tokens are drawn (the totals still count all of them).
    """
    if cmap is None or len(cmap.pieces) == 0:
        return (
            '<div class="cache-map empty" data-tokens="0" data-evicted="0">'
            "The conversation's tokens appear here, coloured by what the cache keeps.</div>"
        )
    pieces = list(cmap.pieces)
    n = len(pieces)
    in_cache = np.asarray(cmap.in_cache, dtype=bool)[:n]
    score = np.asarray(cmap.score, dtype=np.float64)[:n]
    protected = np.asarray(cmap.protected, dtype=bool)[:n]
    # the last sampled token is not in the cache yet (it is fed with the next step), yet not evicted either
    evicted = np.asarray(getattr(cmap, "evicted", ~in_cache), dtype=bool)[:n]
    levels = _score_levels(score, in_cache & ~protected)
    n_kept, n_prot = int(in_cache.sum()), int((in_cache & protected).sum())
    n_gone = int(evicted.sum())
    start = max(0, n - max_tokens)

    spans = []
    for i in range(start, n):
        piece = pieces[i]
        if evicted[i]:
            cls = "tok gone"
            what = "evicted"
        elif not in_cache[i]:
            cls = "tok pending"
            what = "sampled, enters the cache with the next step"
        elif protected[i]:
            cls = "tok kept prot"
            what = "in cache, protected (sink or recent)"
        elif levels[i] >= 0:
            cls = f"tok kept s{levels[i]}"
            what = f"in cache, score {score[i]:.3g}"
        else:
            cls = "tok kept unscored"
            what = "in cache, not scored yet"
        if piece.startswith("<|") and piece.endswith("|>"):
            cls += " special"
        title = html.escape(f"#{i} {piece!r}: {what}", quote=True)
        spans.append(f'<span class="{cls}" title="{title}">{_piece_html(piece)}</span>')

    legend = (
        '<div class="cm-legend">'
        f'<span class="cm-count">{n} tokens</span>'
        f'<span class="tok kept s4">kept, high score</span><span class="tok kept s0">kept, low score</span>'
        f'<span class="tok kept prot">protected</span><span class="tok gone">evicted</span>'
        f'<span class="cm-count">in cache {n_kept} · protected {n_prot} · evicted {n_gone}</span>'
        "</div>"
    )
    note = f'<div class="cm-note">showing the last {n - start} of {n} tokens</div>' if start else ""
    return (
        f'<div class="cache-map" data-tokens="{n}" data-kept="{n_kept}" data-evicted="{n_gone}">'
        f'{legend}{note}<div class="cm-tokens">{"".join(spans)}</div></div>'
    )
