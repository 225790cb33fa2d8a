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


def policy_names() -> str:
    """What `--policy` and `LLM(policy=...)` accept, for help texts and error messages."""
    return f"{', '.join(POLICIES)}, quest, or <policy>+quest"


def make_policy(name: str, **options: object) -> Policy:
    """The policy registered under `name` with PolicyOptions overrides (None values ignored)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](**{k: v for k, v in options.items() if v is not None})


def parse_policy(spec: str) -> tuple[str, bool]:
    """'laprox+quest' -> ('laprox', True); 'quest' -> ('full', True); 'h2o' -> ('h2o', False).
    The one parser of policy names: LLM.configure, the CLI and the eval specs all use it."""
    names = spec.split("+")
    uses_quest = "quest" in names
    rest = [name for name in names if name != "quest"]
    if len(rest) > 1 or (uses_quest and names.count("quest") > 1):
        raise ValueError(f"policy {spec!r}: combine at most one eviction policy with quest")
    name = rest[0] if rest else "full"
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {policy_names()}")
    return name, uses_quest


__all__ = [
    "POLICIES", "Policy", "PolicyOptions", "PromptLayer", "make_policy", "parse_policy",
    "policy_names",
]  # fmt: skip
