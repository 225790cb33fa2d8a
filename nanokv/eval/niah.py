"""Needle in a haystack, RULER-style (Hsieh et al. 2024), generated: no download.

Tasks (RULER's niah_single, niah_multikey, niah_multivalue):
- single: one needle "One of the special magic numbers for <key> is: <7 digits>.", asked back;
- multikey: four needles with different keys, one of them asked;
- multivalue: four needles with the same key and different values, all asked.

A case is fully determined by its id, ``niah/<task>/<filler>/L<tokens>/d<depth>/s<seed>``:
the haystack from (filler, seed), keys and values from the whole id. The asked needle sits at
`depth` of the haystack; other needles at seeded random depths. The prompt -- instructions,
haystack, question, chat template, answer prefix -- has `tokens` tokens in the question-aware
setting (the context-only setting prefills the same text minus the question).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from nanokv.eval.ask import build_prompt
from nanokv.eval.haystack import FILLERS, build_haystack, filler_stream
from nanokv.eval.tokens import counter
from nanokv.tokenizer import Tokenizer

TASKS = ("single", "multikey", "multivalue")
NEEDLES = {"single": 1, "multikey": 4, "multivalue": 4}
HEADER = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "it. I will quiz you about the numbers afterwards.\n"
)
_ADJECTIVES = (
    "ancient", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly",
    "keen", "lively", "misty", "noble", "orange", "proud", "quiet", "rapid", "silent", "tidy",
    "upbeat", "vivid", "wild", "young",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "candle", "desert", "engine", "falcon", "garden", "harbor", "island",
    "jungle", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river",
    "saddle", "tunnel", "violin", "walnut", "yacht", "zebra",
)  # fmt: skip
_ID = re.compile(r"^niah/(\w+)/(\w+)/L(\d+)/d([0-9.]+)/s(\d+)$")


@dataclass(frozen=True)
class NiahSpec:
    task: str
    filler: str
    length: int  # prompt tokens (question-aware)
    depth: float  # in [0, 1]: where the asked needle sits in the haystack
    seed: int

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.filler not in FILLERS:
            raise ValueError(f"unknown filler {self.filler!r}; choose one of {', '.join(FILLERS)}")
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {self.depth}")

    @property
    def id(self) -> str:
        return f"niah/{self.task}/{self.filler}/L{self.length}/d{self.depth:g}/s{self.seed}"

    @classmethod
    def from_id(cls, case_id: str) -> NiahSpec:
        """The spec a case id names (ids are the reproducible handle of a case)."""
        match = _ID.match(case_id)
        if match is None:
            raise ValueError(f"{case_id!r} is not a niah case id (niah/task/filler/L/d/s)")
        task, filler, length, depth, seed = match.groups()
        return cls(task, filler, int(length), float(depth), int(seed))


@dataclass(frozen=True)
class NiahCase:
    spec: NiahSpec
    document: str  # instructions + haystack with the needles: what context-only compresses
    question: str  # follows the document inside the same user message
    answer_prefix: str  # primes the answer
    expected: tuple[str, ...]  # values that must appear in the answer
    asked: tuple[str, ...]  # the needle sentences that hold the expected values
    depths: tuple[float, ...]  # depth of every needle (asked first)
    sources: tuple[str, ...]  # where the haystack's filler came from


def make_case(spec: NiahSpec, tokenizer: Tokenizer) -> NiahCase:
    """Generates the case `spec` names, with the question-aware prompt at spec.length tokens
    (within a few tokens; the haystack is corrected twice after measuring)."""
    rng = random.Random(spec.id)
    count = NEEDLES[spec.task]
    keys = _unique(rng, count if spec.task == "multikey" else 1, _key)
    values = _unique(rng, count, lambda r: str(r.randrange(1_000_000, 10_000_000)))
    asked_key = keys[0]
    owners = keys if spec.task == "multikey" else [asked_key] * count
    sentences = [_needle(k, v) for k, v in zip(owners, values, strict=True)]
    depths = [spec.depth] + [rng.random() for _ in range(count - 1)]
    expected = values[:1] if spec.task != "multivalue" else values
    question, prefix = _question(spec.task, asked_key)
    needles = sorted(zip(depths, sentences, strict=True))  # insertion order: by depth
    target = spec.length - _overhead(tokenizer, question, prefix)
    haystack, document = None, ""
    for _ in range(3):  # measure, correct the filler by the difference, measure again
        haystack = build_haystack(
            filler_stream(spec.filler, spec.seed), target, needles, counter(tokenizer)
        )
        document = HEADER + haystack.text
        error = spec.length - build_prompt(tokenizer, "question", document, question, prefix).tokens
        if error == 0:
            break
        target += error
    asked = tuple(sentences[: len(expected)])
    return NiahCase(
        spec, document, question, prefix, tuple(expected), asked, tuple(depths), haystack.sources
    )


def _overhead(tokenizer: Tokenizer, question: str, prefix: str) -> int:
    """Prompt tokens that are not filler: instructions, question, template, prefix."""
    return build_prompt(tokenizer, "question", HEADER.rstrip("\n"), question, prefix).tokens


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _unique(rng: random.Random, count: int, draw) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = draw(rng)
        if value not in values:
            values.append(value)
    return values


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _question(task: str, key: str) -> tuple[str, str]:
    if task == "multivalue":
        return (
            f"\nWhat are all the special magic numbers for {key} mentioned in the provided text?",
            f"The special magic numbers for {key} mentioned in the provided text are",
        )
    return (
        f"\nWhat is the special magic number for {key} mentioned in the provided text?",
        f"The special magic number for {key} mentioned in the provided text is",
    )


def score(answer: str, expected: tuple[str, ...] | list[str]) -> float:
    """Share of the expected values that appear in `answer` as whole numbers (a longer or
    shorter digit run does not count)."""
    found = set(re.findall(r"\d+", answer))
    return sum(value in found for value in expected) / len(expected)
