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


DEFAULT_POLICY = "laprox"  # what a budget below the whole cache runs when no policy is named


def policy_for_budget(policy: str | None, budget: float) -> str:
    """The policy a budget runs: the one named, else 'full' for a budget of 1.0 (every token
    kept) and nanokv's default eviction policy, LaProx (the most needles kept and the lowest
    KL in docs/eval.md), for any smaller budget. A named 'full' with a smaller budget is a
    ValueError: it would keep every token and ignore the budget without a word."""
    if policy is None:
        return "full" if budget == 1.0 else DEFAULT_POLICY
    name, uses_quest = parse_policy(policy)
    if name == "full" and not uses_quest and budget != 1.0:
        raise ValueError(
            f"budget {budget:g} needs an eviction policy: 'full' keeps every token; name one "
            f"({', '.join(list(POLICIES)[1:])}) or leave the policy unset for {DEFAULT_POLICY}"
        )
    return policy


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
    "DEFAULT_POLICY", "POLICIES", "Policy", "PolicyOptions", "PromptLayer", "make_policy",
    "parse_policy", "policy_for_budget", "policy_names",
]  # fmt: skip
