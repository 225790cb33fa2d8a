"""Policy specs of the command line: ``NAME[:key=value,...]``, each one row of the results.

NAME is an engine policy (full, streaming, h2o, snapkv, tova, auv, laprox), ``quest``,
``<policy>+quest``, or ``needle-oracle``: a diagnostic, a policy (snapkv unless ``base=`` says
otherwise) whose prompt scores are overridden so that the asked value's tokens and the period
after it are always kept, as DESIGN.md's oracle row; NIAH only. Keys are PolicyOptions fields
(``window`` is short for observation_window) and the Quest settings ``quest_budget``, ``oracle``
(rank pages by true attention) and ``dense``. Examples: ``laprox:pool=31,allocation=global``,
``quest:oracle``, ``needle-oracle:base=laprox``. The spec text, normalised, is the row's label.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from nanokv.budget import Budget
from nanokv.engine import Engine
from nanokv.llm import LLM
from nanokv.policies import Policy, PolicyOptions, make_policy, parse_policy

NEEDLE_ORACLE = "needle-oracle"
_ALIASES = {"window": "observation_window"}
_QUEST_KEYS = {
    "quest_budget": "quest_budget",
    "oracle": "quest_oracle",
    "dense": "quest_dense_layers",
}
_OPTION_KEYS = {f.name for f in fields(PolicyOptions)}
_FORCED = 1e9  # prompt score of a forced token: above any real score, finite for sorting


@dataclass(frozen=True)
class PolicySpec:
    label: str
    policy: str  # what LLM.configure takes: "snapkv", "quest", "laprox+quest"
    options: dict[str, object] = field(default_factory=dict)  # PolicyOptions fields
    quest: dict[str, object] = field(default_factory=dict)  # quest_budget, quest_oracle, ...
    needle_oracle: bool = False

    @property
    def is_full(self) -> bool:
        return self.policy == "full" and not self.needle_oracle


def parse_spec(text: str) -> PolicySpec:
    """Parses and validates one spec; a bad name, key or value raises ValueError."""
    name, _, rest = text.strip().partition(":")
    pairs = [_pair(item, text) for item in rest.split(",") if item.strip()]
    oracle = name == NEEDLE_ORACLE
    base = next((v for k, v in pairs if k == "base"), "snapkv") if oracle else name
    pairs = [(k, v) for k, v in pairs if k != "base"]
    options, quest = {}, {}
    for key, value in pairs:
        key = _ALIASES.get(key, key)
        if key in _QUEST_KEYS:
            quest[_QUEST_KEYS[key]] = _value(key, value)
        elif key in _OPTION_KEYS:
            options[key] = _value(key, value)
        else:
            known = ", ".join(sorted({*_OPTION_KEYS, *_QUEST_KEYS, "window", "base"}))
            raise ValueError(f"policy spec {text!r}: unknown key {key!r}; known keys: {known}")
    evicting, uses_quest = parse_policy(str(base))
    make_policy(evicting, **options)  # validates the options now, before any model is loaded
    if quest and not uses_quest:
        raise ValueError(f"policy spec {text!r}: Quest keys need 'quest' or '<policy>+quest'")
    if oracle and evicting == "full":
        raise ValueError(f"policy spec {text!r}: the needle oracle needs an evicting base policy")
    return PolicySpec(_label(text), str(base), options, quest, oracle)


def _pair(item: str, text: str) -> tuple[str, str]:
    key, equals, value = item.strip().partition("=")
    if not equals:
        return key, "true"  # a bare flag such as quest:oracle
    if not value:
        raise ValueError(f"policy spec {text!r}: {key!r} has no value")
    return key.strip(), value.strip()


def _value(key: str, text: str) -> object:
    """int, float, bool or string, as the option expects."""
    lowered = text.lower()
    if lowered in ("true", "false", "yes", "no", "on", "off"):
        return lowered in ("true", "yes", "on")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _label(text: str) -> str:
    return "".join(text.split())


def engine_for(
    llm: LLM, spec: PolicySpec, budget: float, min_cache: int = 0, setting: str = "question"
) -> tuple[Engine, Policy | None]:
    """An engine for `spec` at `budget` (with the cache floor `min_cache`, 0: exact) on the
    loaded model; with the needle oracle, also the wrapper whose `forced` positions the caller
    sets per case. The context-only setting runs what `LLM.compress` runs (KVzip's probe for
    the policies with an observation window, unless the spec sets `observe`)."""
    chosen = Budget(1.0) if spec.is_full else Budget(budget, floor=min_cache)
    llm.configure(spec.policy, chosen, **spec.quest, **spec.options)
    context = setting == "context"
    if not spec.needle_oracle:
        return (llm.compress_engine if context else llm.engine), None
    oracle = needle_forcing(llm.compress_policy if context else llm.policy)
    engine = Engine(
        llm.model,
        llm.config,
        oracle,
        budget=llm.budget,
        quest=llm.quest,
        prefill_chunk=llm.prefill_chunk,
    )
    return engine, oracle


def floor_fields(engine: Engine, policy: PolicySpec, length: int, min_cache: int) -> dict:
    """A row's `min_cache` and whether the floor, not the budget, set its cache (`floored`) for
    `length` tokens (the prompt, or a conversation's tokens seen)."""
    floored = not policy.is_full and engine.eviction.is_floored(length)
    return {"min_cache": min_cache, "floored": floored}


def needle_forcing(policy: Policy) -> Policy:
    """A copy of `policy` whose prompt scores put the positions in `.forced` above every other
    token, so the selection keeps them in every layer and head (their score also outranks
    anything at decode-time evictions). Everything else is the base policy's."""
    base = type(policy)

    class NeedleOracle(base):
        name = f"{NEEDLE_ORACLE}({base.name})"

        def prefill_scores(self, prompt):
            scores = super().prefill_scores(prompt)  # (H_kv, n)
            hit = torch.isin(prompt.positions, self.forced.to(prompt.positions.device))
            return torch.where(hit, torch.full_like(scores, _FORCED), scores)

    oracle = NeedleOracle(
        **{f.name: getattr(policy.options, f.name) for f in fields(PolicyOptions)}
    )
    oracle.forced = torch.empty(0, dtype=torch.long)
    return oracle
