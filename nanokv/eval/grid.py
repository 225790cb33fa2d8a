"""What an evaluation runs: policies x budgets x cases, with the `--quick` and full presets.

A cell of the summary is one policy x budget x length (x setting, task and filler for NIAH, x
text for fidelity); its cases are the depths x seeds (NIAH) or the seeds (fidelity windows, code
cuts, chat conversations), the same cases for every policy.

- `--quick`: sized to finish in under 10 minutes for all three suites together on two CPU cores
  with the default model (prefill ~1.7 s per 1k tokens, decode ~17 tokens/s). NIAH: full,
  snapkv, laprox, quest and the two diagnostics at 5% / 10%, single needle in prose at 1k / 2k,
  depths 0.25 / 0.75 x seed 0 (2 cases a cell), both settings; fidelity: the main policies,
  docs, 2k context, 32 tokens, seed 0 (1 window a cell); code: the main policies, 1k, seeds 0, 1
  (2 cases a cell). A smoke test of the pipeline, not a measurement.
- full (the README's tables; an afternoon on two CPU cores, timings in docs/eval.md): NIAH:
  full, streaming, snapkv, tova, laprox, quest and the two diagnostics at 5% / 10%, single needle
  in prose at 1k / 2k, 5 depths x 2 seeds (10 cases a cell), both settings (h2o and auv score
  without the question and cost a second pass over every query: add them with --policies);
  fidelity: every policy plus the SnapKV / LaProx variants of the defaults study at 5% / 10%,
  docs and code, 2k, 32 tokens, 8 seeds (8 windows a cell); code: the main policies, 1k / 2k, 10
  seeds (10 cases a cell). Other tasks, fillers, lengths and budgets are one flag away.
- chat (not part of `all`'s time above: a conversation recompresses its arena after each of
  its ten answers, with KVzip's probe for snapkv, tova and laprox, several minutes a
  conversation on one core): quick: full, streaming and laprox at 10%, 1k user tokens, seed 0
  (1 conversation a cell); full: full, streaming, h2o, snapkv, auv, laprox at 5% / 10%, 1k, 10
  seeds (10 conversations a cell); both with the fact in its own first turn (`--facts inside`:
  a sentence inside an early turn's passage).

Every preset keeps a cache floor of `min_cache` = 128 tokens: the engine keeps no head below it,
and a prompt plus answer that fits under it is never evicted, so a small budget of a short prompt
is not really that budget (the summary marks such cells; `--min-cache 0` makes budgets exact).
Any flag given on the command line replaces that field of the preset.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from nanokv.budget import Budget
from nanokv.eval.ask import SETTINGS
from nanokv.eval.chat import FACTS, ChatSpec, check_chat_length, check_chat_policy
from nanokv.eval.code import CodeSpec
from nanokv.eval.fidelity import SOURCES, FidelitySpec
from nanokv.eval.haystack import FILLERS
from nanokv.eval.niah import TASKS, NiahSpec, check_needles_fit, check_questions
from nanokv.eval.specs import PolicySpec, parse_spec

SUITES = ("niah", "fidelity", "code", "chat")
ALL = ("niah", "fidelity", "code")  # `nanokv eval all`: chat, minutes a conversation, runs alone
SPEC_TYPES = {"niah": NiahSpec, "fidelity": FidelitySpec, "code": CodeSpec, "chat": ChatSpec}
_MAIN = ("full", "streaming", "h2o", "snapkv", "auv", "laprox", "quest")
_DIAGNOSTICS = ("quest:oracle", "needle-oracle")


@dataclass(frozen=True)
class Grid:
    policies: tuple[str, ...]  # policy specs (see specs.py)
    budgets: tuple[float, ...]
    lengths: tuple[int, ...]  # prompt / context tokens
    seeds: tuple[int, ...]
    depths: tuple[float, ...] = (0.5,)  # niah
    tasks: tuple[str, ...] = ("single",)  # niah
    fillers: tuple[str, ...] = ("prose",)  # niah
    settings: tuple[str, ...] = SETTINGS  # niah: question-aware and/or context-only
    needles: int = 1  # niah: > 1, that many needles a document, each asked (replaces depths)
    texts: tuple[str, ...] = SOURCES  # fidelity: docs and/or code
    facts: tuple[str, ...] = ("first",)  # chat: where the fact is (chat.FACTS)
    tokens: int = 32  # fidelity: teacher-forced continuation tokens
    cases: tuple[str, ...] = ()  # case ids: run these instead of the grid's cases
    min_cache: int = 128  # cache floor in tokens: no head is cut below it (0: exact budgets)

    def specs(self) -> list[PolicySpec]:
        return [parse_spec(text) for text in self.policies]

    def runs(self) -> list[tuple[PolicySpec, float]]:
        """(policy, budget) pairs in grid order; `full` once, at budget 1."""
        pairs = []
        for spec in self.specs():
            budgets = (1.0,) if spec.is_full else self.budgets
            pairs += [(spec, budget) for budget in budgets]
        return pairs

    def validate(self, suite: str, context: int | None = None) -> None:
        """Raises ValueError for a value that cannot run; `context` is the model's window."""
        specs = self.specs()
        for budget in self.budgets:
            Budget(budget)
        _check_names("task", self.tasks, TASKS)
        _check_names("filler", self.fillers, FILLERS)
        _check_names("setting", self.settings, SETTINGS)
        _check_names("text", self.texts, SOURCES)
        _check_names("chat fact", self.facts, FACTS)
        for depth in self.depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"depth must be in [0, 1], got {depth}")
        if self.min_cache < 0:
            raise ValueError(f"--min-cache must be at least 0 tokens, got {self.min_cache}")
        if self.tokens < 2:
            raise ValueError(f"--tokens must be at least 2, got {self.tokens}")
        if not self.policies or not self.budgets or not self.lengths or not self.seeds:
            raise ValueError("the grid is empty: give at least one policy, budget, length, seed")
        self._check_suite(suite, specs, context)

    def _check_suite(self, suite: str, specs: list[PolicySpec], context: int | None) -> None:
        """What only `suite` constrains: its lengths against the model's window, its policies."""
        if suite != "niah" and any(spec.needle_oracle for spec in specs):
            raise ValueError("needle-oracle has no needle outside niah: drop it from --policies")
        if suite == "niah":
            check_questions(self.needles, self.tasks)
            for length in self._lengths(suite):
                check_needles_fit(self.needles, length)
        if suite == "chat":  # a conversation: ten turns and their answers must fit
            for spec in specs:
                check_chat_policy(spec)
            for length in self._lengths(suite):
                check_chat_length(length, context)
            return
        for length in self._lengths(suite):
            if length < 64:
                raise ValueError(f"length {length} is too short: give at least 64 tokens")
            if context is not None and length + max(self.tokens, 64) > context:
                raise ValueError(
                    f"length {length} plus the tokens to generate exceeds the model's "
                    f"{context}-token context"
                )

    def _lengths(self, suite: str) -> tuple[int, ...]:
        """The lengths `suite` will run: the grid's, or those of its `cases` ids (each id is
        checked: a malformed one raises ValueError)."""
        if not self.cases:
            return self.lengths
        for case_id in self.cases:
            if case_id.split("/")[0] not in SUITES:
                raise ValueError(
                    f"{case_id!r} is not a case id (niah/..., fidelity/..., code/..., chat/...)"
                )
        chosen = [SPEC_TYPES[suite].from_id(c) for c in self.cases if c.startswith(f"{suite}/")]
        if not chosen:
            raise ValueError(f"none of the --cases ids is a {suite} case")
        return tuple(spec.length for spec in chosen)


def _check_names(what: str, given: tuple[str, ...], known: tuple[str, ...]) -> None:
    for name in given:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(known)}")


QUICK = {
    "niah": Grid(
        policies=("full", "snapkv", "laprox", "quest") + _DIAGNOSTICS,
        budgets=(0.05, 0.1), lengths=(1024, 2048), seeds=(0,), depths=(0.25, 0.75),
    ),
    "fidelity": Grid(
        policies=_MAIN, budgets=(0.05, 0.1), lengths=(2048,), seeds=(0,), texts=("docs",),
    ),
    "code": Grid(policies=_MAIN, budgets=(0.05, 0.1), lengths=(1024,), seeds=(0, 1)),
    "chat": Grid(
        policies=("full", "streaming", "laprox"), budgets=(0.1,), lengths=(1024,), seeds=(0,),
    ),
}  # fmt: skip

_NIAH_FULL = ("full", "streaming", "snapkv", "tova", "laprox", "quest") + _DIAGNOSTICS
_VARIANTS = ("snapkv:pool=31", "laprox:normalise=sum", "laprox:allocation=uniform")
_FIDELITY_FULL = (
    "full", "streaming", "h2o", "snapkv", "tova", "auv", "laprox", "quest", *_VARIANTS,
)  # fmt: skip
_CHAT_FULL = ("full", "streaming", "h2o", "snapkv", "auv", "laprox")  # no quest in a chat
FULL = {
    "niah": Grid(
        policies=_NIAH_FULL, budgets=(0.05, 0.1), lengths=(1024, 2048), seeds=(0, 1),
        depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    ),
    "fidelity": Grid(
        policies=_FIDELITY_FULL, budgets=(0.05, 0.1), lengths=(2048,), seeds=tuple(range(8)),
    ),
    "code": Grid(
        policies=_MAIN, budgets=(0.05, 0.1), lengths=(1024, 2048), seeds=tuple(range(10)),
    ),
    "chat": Grid(
        policies=_CHAT_FULL, budgets=(0.05, 0.1), lengths=(1024,), seeds=tuple(range(10)),
    ),
}  # fmt: skip


def resolve(suite: str, quick: bool, overrides: dict[str, object]) -> Grid:
    """The preset for `suite`, with the given (non-None) fields replaced."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    names = {f.name for f in fields(Grid)}
    given = {k: v for k, v in overrides.items() if v is not None and k in names}
    return replace((QUICK if quick else FULL)[suite], **given)
