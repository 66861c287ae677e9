"""Prometheus text exposition of the server's counters and of the slots' caches (no dependency)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .slots import SlotPool


class Metrics:
    """Counters updated on the event loop; gauges read from the slot pool when scraped."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.reused_tokens = 0
        self.prefilled_tokens = 0
        self.evictions = 0
        self.evicted_tokens = 0
        self.cancelled = 0
        self.rejected_queue_full = 0

    def request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def finished(self, usage: dict, kv_before: Mapping[str, Any]) -> None:
        """Fold one finished generation's usage (and its kv block against the one before it) in."""
        kv = usage.get("kv") or {}
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)
        reused = int(kv.get("reused_tokens") or 0)
        self.reused_tokens += reused
        self.prefilled_tokens += max(int(usage.get("prompt_tokens") or 0) - reused, 0)
        self.evictions += max(int(kv.get("evictions") or 0) - int(kv_before.get("evictions") or 0), 0)
        self.evicted_tokens += max(int(kv.get("evicted_tokens") or 0) - int(kv_before.get("evicted_tokens") or 0), 0)

    def render(self, pool: SlotPool, capacity: int, bytes_per_cell: int, bounded_bytes_per_slot: int = 0) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        metric("infokv_requests_total", "counter",
               "HTTP requests by endpoint and status (499: the client went away first; a stream counts at its end)",
               [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())] or
               [('{endpoint="",status=""}', 0)])
        metric("infokv_prompt_tokens_total", "counter", "prompt tokens of finished requests",
               [("", self.prompt_tokens)])
        metric("infokv_completion_tokens_total", "counter", "generated tokens", [("", self.completion_tokens)])
        metric("infokv_reused_tokens_total", "counter", "prompt tokens taken from a slot's cache, not prefilled",
               [("", self.reused_tokens)])
        metric("infokv_prefilled_tokens_total", "counter", "prompt tokens prefilled", [("", self.prefilled_tokens)])
        metric("infokv_evictions_total", "counter", "cache compressions", [("", self.evictions)])
        metric("infokv_evicted_tokens_total", "counter", "tokens evicted from the caches", [("", self.evicted_tokens)])
        metric("infokv_cancelled_total", "counter", "generations cancelled by a client disconnect",
               [("", self.cancelled)])
        metric("infokv_rejected_total", "counter", "requests refused with 503 (queue full)",
               [("", self.rejected_queue_full)])
        metric("infokv_kv_cells_used", "gauge", "KV cells in use, per slot",
               [(f'{{slot="{s.id}"}}', int(s.kv.get("used_cells") or 0)) for s in pool.slots])
        metric("infokv_kv_cells_used_total", "gauge", "KV cells in use over all slots", [("", pool.used_cells())])
        metric("infokv_kv_cells_limit", "gauge", "slots x (budget + buffer)", [("", capacity * len(pool.slots))])
        metric("infokv_kv_bytes_used", "gauge", "KV bytes in use over all slots",
               [("", pool.used_cells() * bytes_per_cell)])
        metric("infokv_kv_bounded_bytes", "gauge", "bytes of the memory that does not grow (a sliding-window cache, a "
               "recurrent state) over all slots", [("", bounded_bytes_per_slot * len(pool.slots))])
        checkpoint_bytes = sum(int(s.kv.get("checkpoint_bytes") or 0) for s in pool.slots)
        metric("infokv_checkpoint_bytes", "gauge", "host memory of the slots' checkpoints of that memory (a "
               "regenerated or edited last turn goes back to one)", [("", checkpoint_bytes)])
        metric("infokv_slots_busy", "gauge", "slots generating", [("", sum(s.busy for s in pool.slots))])
        metric("infokv_slots", "gauge", "slots", [("", len(pool.slots))])
        metric("infokv_queue_length", "gauge", "requests waiting for a slot", [("", pool.waiting)])
        batching = pool.batching()
        metric("infokv_batched_steps_total", "counter",
               "decodes of generation steps, each holding the next token of every slot generating then",
               [("", batching["batched_steps"])])
        metric("infokv_batched_tokens_total", "counter",
               "tokens those decodes held (over infokv_batched_steps_total: slots per step)",
               [("", batching["batched_tokens"])])
        metric("infokv_parked_conversations", "gauge", "conversations parked in RAM", [("", len(pool.store))])
        metric("infokv_parked_bytes", "gauge", "RAM held by parked conversations", [("", pool.store.nbytes)])
        metric("infokv_parked_total", "counter", "conversations parked", [("", pool.parked_total)])
        metric("infokv_restored_total", "counter", "parked conversations restored", [("", pool.restored_total)])
        return "\n".join(lines) + "\n"
