"""Eviction policies by name."""

from __future__ import annotations

from nanokv.policies.auv import AUV
from nanokv.policies.base import Policy, PolicyOptions, PromptLayer
from nanokv.policies.full import FullCache
from nanokv.policies.h2o import H2O
from nanokv.policies.laprox import LaProx
from nanokv.policies.snapkv import SnapKV
from nanokv.policies.streaming import StreamingLLM
from nanokv.policies.tova import TOVA

POLICIES: dict[str, type[Policy]] = {
    "full": FullCache,
    "streaming": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "tova": TOVA,
    "auv": AUV,
    "laprox": LaProx,
}


def make_policy(name: str, **options: object) -> Policy:
    """The policy registered under `name` with PolicyOptions overrides (None values ignored)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](**{k: v for k, v in options.items() if v is not None})


__all__ = ["POLICIES", "Policy", "PolicyOptions", "PromptLayer", "make_policy"]
