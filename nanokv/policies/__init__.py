"""Eviction policies by name."""

from __future__ import annotations

from nanokv.policies.base import Policy, PromptLayer
from nanokv.policies.full import FullCache

POLICIES: dict[str, type[Policy]] = {"full": FullCache}


def make_policy(name: str) -> Policy:
    """The policy registered under `name`, or a ValueError listing the known names."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()


__all__ = ["POLICIES", "Policy", "PromptLayer", "make_policy"]
