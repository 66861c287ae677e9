"""The live cache panel: cells in use against the budget, KV memory, evictions, speed.

Rendered as HTML for ``gr.HTML``; every number also sits in a ``data-value`` attribute so tests (and
anyone scraping the page) can read it without parsing text.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

MIB = 1024 * 1024


def _stat(key: str, label: str, value: float | int, shown: str) -> str:
    return (
        f'<div class="kv-stat kv-{key}" data-value="{value}"><span class="kv-label">{html.escape(label)}</span>'
        f'<span class="kv-value">{html.escape(shown)}</span></div>'
    )


def render_panel(kv: Mapping[str, Any] | None, state: str = "idle") -> str:
    """HTML for a ``kv`` dict (as in the API's stream chunks and ``kv_stats()``); ``state`` is a short status word."""
    kv = kv or {}
    used = int(kv.get("used_cells", 0) or 0)
    budget = int(kv.get("budget", 0) or 0)
    buffer = int(kv.get("buffer", 0) or 0)
    peak = int(kv.get("max_used_cells", 0) or 0)
    kv_bytes = int(kv.get("kv_bytes", 0) or 0)
    per_token = int(kv.get("kv_bytes_per_token", 0) or 0)
    evictions = int(kv.get("evictions", 0) or 0)
    evicted = int(kv.get("evicted_tokens", 0) or 0)
    tps = float(kv.get("tokens_per_s", 0.0) or 0.0)
    limit = budget + buffer if budget else int(kv.get("capacity", 0) or 0)
    frac = min(1.0, used / limit) if limit else 0.0
    budget_frac = budget / limit if limit else 1.0
    over = " over" if budget and used > budget else ""
    meter = (
        f'<div class="kv-meter{over}" title="cells in use / budget + buffer">'
        f'<div class="kv-fill" style="width:{100 * frac:.1f}%"></div>'
        f'<div class="kv-budget-mark" style="left:{100 * budget_frac:.1f}%"></div></div>'
    )
    stats = "".join([
        _stat("used", "cells in use", used,
              f"{used} / {budget}" + (f" (+{buffer})" if buffer else "") if budget else f"{used} (no budget)"),
        _stat("mib", "KV memory", round(kv_bytes / MIB, 3), f"{kv_bytes / MIB:.2f} MiB"),
        _stat("peak", "peak cells", peak, str(peak)),
        _stat("evictions", "compressions", evictions, str(evictions)),
        _stat("evicted", "tokens evicted", evicted, str(evicted)),
        _stat("tps", "tokens/s", round(tps, 1), f"{tps:.1f}"),
    ])
    policy = html.escape(str(kv.get("policy", "")))
    ctype = str(kv.get("cache_type_k", "f16"))
    ctype = ctype if ctype == kv.get("cache_type_v", ctype) else f"{ctype}/{kv.get('cache_type_v')}"
    per = f"{per_token / 1024:.1f} KiB per token" + (f" ({html.escape(ctype)})" if ctype != "f16" else "") \
        if per_token else ""
    bounded = int(kv.get("bounded_bytes", 0) or 0)
    beside = (f'<span class="kv-bounded" data-value="{bounded}"> · beside {bounded / MIB:.2f} MiB of '
              f'{html.escape(str(kv.get("memory", "")))} memory that does not grow</span>') if bounded else ""
    note = f'<div class="kv-note">{html.escape(str(kv["eviction_note"]))}</div>' if kv.get("eviction_note") else ""
    probe_len = int(kv.get("prompt_probe", 0) or 0)
    probes = int(kv.get("probes", 0) or 0)
    probe = (f'<span class="kv-probes" data-value="{probes}"> · prompt probe of {probe_len} tokens, read {probes}x'
             '</span>') if probe_len else ""
    reused = int(kv.get("reused_tokens", 0) or 0)  # a request's: the conversation kept, not read again
    probe += f'<span class="kv-reused" data-value="{reused}"> · {reused} tokens of history reused</span>' \
        if reused else ""
    n_checkpoints = int(kv.get("checkpoints", 0) or 0)
    checkpoint_mib = int(kv.get("checkpoint_bytes", 0) or 0) / MIB
    probe += (f'<span class="kv-checkpoints" data-value="{n_checkpoints}"> · {n_checkpoints} checkpoints '
              f'({checkpoint_mib:.1f} MiB) to go back to</span>') if n_checkpoints else ""
    return (
        f'<div class="kv-panel" data-state="{html.escape(state)}">'
        f'<div class="kv-head"><span class="kv-policy">{policy or "no cache yet"}</span>'
        f'<span class="kv-state">{html.escape(state)}</span></div>'
        f'{meter}<div class="kv-grid">{stats}</div><div class="kv-foot" data-cache-type="{html.escape(ctype)}">{per}'
        f'{beside}{probe}</div>{note}</div>'
    )
