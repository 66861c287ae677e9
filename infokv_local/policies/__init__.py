"""Eviction policies: one small class per method, scoring only (see :mod:`.base`)."""

from __future__ import annotations

from typing import Any

from .base import ATTENTION, ENTROPY, LAYER_DIST, Policy, ScoreInput
from .context_shift import ContextShiftPolicy
from .full import FullPolicy
from .h2o import H2OPolicy
from .infokv import InfoKVPolicy
from .random_eviction import RandomPolicy
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy
from .tova import TOVAPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (FullPolicy, StreamingPolicy, ContextShiftPolicy, H2OPolicy, SnapKVPolicy, TOVAPolicy, RandomPolicy,
                InfoKVPolicy)
}


def make_policy(spec: str | Policy, **params: Any) -> Policy:
    """A policy from its name (``"infokv"``, ``"snapkv"``, ...) and parameters, or the object itself."""
    if isinstance(spec, Policy):
        if params:
            raise ValueError("parameters are given with a policy name, not with a policy object")
        return spec
    try:
        cls = POLICIES[spec]
    except KeyError:
        raise ValueError(f"unknown policy {spec!r}; choose one of {', '.join(POLICIES)}") from None
    return cls(**params)


__all__ = [
    "ATTENTION", "ENTROPY", "LAYER_DIST", "POLICIES", "ContextShiftPolicy", "FullPolicy", "H2OPolicy",
    "InfoKVPolicy", "Policy", "RandomPolicy", "ScoreInput", "SnapKVPolicy", "StreamingPolicy", "TOVAPolicy",
    "make_policy",
]
