"""Eviction policies: one small class per method, scoring only (see :mod:`.base`)."""

from __future__ import annotations

from typing import Any

from ..errors import PolicyError
from .base import ATTENTION, ATTENTION_ALL_ROWS, ENTROPY, KEYS, LAYER_DIST, Policy, ScoreInput
from .context_shift import ContextShiftPolicy
from .full import FullPolicy
from .h2o import H2OPolicy
from .infokv import InfoKVPaperPolicy, InfoKVPolicy, InfoKVRedundancyPolicy
from .keydiff import KeyDiffPolicy
from .random_eviction import RandomPolicy
from .rkv import RKVPolicy
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy
from .tova import TOVAPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (FullPolicy, StreamingPolicy, ContextShiftPolicy, H2OPolicy, SnapKVPolicy, TOVAPolicy, RandomPolicy,
                KeyDiffPolicy, RKVPolicy, InfoKVPolicy, InfoKVPaperPolicy, InfoKVRedundancyPolicy)
}


# options every policy takes, applied by the engine around the policy's scores
ENGINE_SWITCHES = ("whole_numbers", "keep_prompt")


def make_policy(spec: str | Policy, **params: Any) -> Policy:
    """A policy from its name and parameters, or the object itself.

    ``spec`` is a name (``"infokv"``, ``"snapkv"``, ...), optionally with parameters:
    ``"infokv:alpha=0.95,entropy=at"`` (``+`` also separates them; values are read as int, float
    or kept as strings). ``whole_numbers=1`` and ``keep_prompt=1`` are every policy's
    (:attr:`Policy.whole_numbers`, :attr:`Policy.keep_prompt`).
    """
    if isinstance(spec, Policy):
        if params:
            raise PolicyError("parameters are given with a policy name, not with a policy object")
        return spec
    name, _, rest = spec.partition(":")
    for item in filter(None, rest.replace("+", ",").split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise PolicyError(f"bad policy parameter {item!r} in {spec!r}: expected key=value")
        params[key.strip()] = _parse_value(value.strip())
    switches = {key: params.pop(key) for key in ENGINE_SWITCHES if key in params}
    for key, value in switches.items():
        if isinstance(value, float) or value not in (0, 1):
            raise PolicyError(f"{key} must be 0 or 1 (got {value!r})")
    try:
        cls = POLICIES[name.strip()]
    except KeyError:
        raise PolicyError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    try:
        policy = cls(**params)
    except TypeError as e:
        raise PolicyError(f"bad parameters for policy {name!r}: {e}") from None
    for key, value in switches.items():
        setattr(policy, key, bool(value))
    return policy


def _parse_value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


__all__ = [
    "ATTENTION", "ATTENTION_ALL_ROWS", "ENTROPY", "KEYS", "LAYER_DIST", "POLICIES", "ContextShiftPolicy",
    "FullPolicy", "H2OPolicy", "InfoKVPaperPolicy", "InfoKVPolicy", "InfoKVRedundancyPolicy", "KeyDiffPolicy",
    "Policy", "RKVPolicy", "RandomPolicy", "ScoreInput", "SnapKVPolicy", "StreamingPolicy", "TOVAPolicy",
    "make_policy",
]
