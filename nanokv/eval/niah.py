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

Many questions of one document (``.../k<K>``, K > 1, task single): K needles with K different
keys sit at K evenly spaced depths (0, 1/(K-1), ..., 1); the K cases of a document, one a depth,
share its text (keys, values and haystack come from the document id, which leaves the depth
out) and each asks its own needle. The context-only setting compresses such a document once and
asks it all K questions; a case is one question.
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
MAX_QUESTIONS = 16  # needles asked of one document (--needles): each ~25 tokens of the haystack
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
_ID = re.compile(r"^niah/(\w+)/(\w+)/L(\d+)/d([0-9.]+)/s(\d+)(?:/k(\d+))?$")


@dataclass(frozen=True)
class NiahSpec:
    task: str
    filler: str
    length: int  # prompt tokens (question-aware)
    depth: float  # in [0, 1]: where the asked needle sits in the haystack
    seed: int
    needles: int = 1  # > 1: needles asked of the document, one a case (task single)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.filler not in FILLERS:
            raise ValueError(f"unknown filler {self.filler!r}; choose one of {', '.join(FILLERS)}")
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {self.depth}")
        check_questions(self.needles, (self.task,))
        if self.needles > 1 and self.depth not in needle_depths(self.needles):
            depths = ", ".join(f"{d:g}" for d in needle_depths(self.needles))
            raise ValueError(
                f"a document of {self.needles} needles has them at depths {depths}: "
                f"depth {self.depth:g} is none of them"
            )

    @property
    def id(self) -> str:
        case = f"niah/{self.task}/{self.filler}/L{self.length}/d{self.depth:g}/s{self.seed}"
        return case if self.needles == 1 else f"{case}/k{self.needles}"

    @property
    def document_id(self) -> str:
        """What the document's text comes from: the case id for one needle; for K needles the
        id less the depth, the same for the K cases (questions) of the document."""
        if self.needles == 1:
            return self.id
        return f"niah/{self.task}/{self.filler}/L{self.length}/s{self.seed}/k{self.needles}"

    @classmethod
    def from_id(cls, case_id: str) -> NiahSpec:
        """The spec a case id names (ids are the reproducible handle of a case)."""
        match = _ID.match(case_id)
        if match is None:
            raise ValueError(f"{case_id!r} is not a niah case id (niah/task/filler/L/d/s[/k])")
        task, filler, length, depth, seed, needles = match.groups()
        return cls(task, filler, int(length), float(depth), int(seed), int(needles or 1))


def check_questions(needles: int, tasks: tuple[str, ...]) -> None:
    """ValueError unless `needles` (asked of one document) is 1, or 2 to MAX_QUESTIONS with only
    the single task (each needle is its own key and its own question)."""
    if not 1 <= needles <= MAX_QUESTIONS:
        raise ValueError(
            f"--needles must be 1 to {MAX_QUESTIONS} needles a document, got {needles}"
        )
    if needles > 1 and set(tasks) != {"single"}:
        raise ValueError(
            f"--needles {needles} asks each of {needles} single needles of one document: "
            "use --tasks single"
        )


def check_needles_fit(needles: int, length: int) -> None:
    """ValueError when `needles` needle sentences (~20 tokens each on a BPE tokenizer; 32
    counted) would take more than half of a `length`-token prompt: the haystack could not be
    sized to the length, and the needles would be most of what is compressed."""
    if needles > 1 and needles * 32 > length // 2:
        raise ValueError(
            f"--needles {needles} take more than half of a {length}-token prompt: give a longer "
            "--lengths or fewer needles"
        )


def needle_depths(needles: int) -> tuple[float, ...]:
    """Where the needles of a K-needle document sit: K evenly spaced depths from 0 to 1 (four
    decimals, so that a case id names its depth exactly); () for one needle (any depth)."""
    if needles == 1:
        return ()
    return tuple(round(i / (needles - 1), 4) for i in range(needles))


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
    rng = random.Random(spec.document_id)
    keys, values, depths = _draw_needles(spec, rng)
    owners = keys if len(keys) == len(values) else keys * len(values)
    sentences = [_needle(k, v) for k, v in zip(owners, values, strict=True)]
    at = 0 if spec.needles == 1 else depths.index(spec.depth)  # the asked needle
    expected = values if spec.task == "multivalue" else values[at : at + 1]
    asked = sentences if spec.task == "multivalue" else sentences[at : at + 1]
    question, prefix = _question(spec.task, keys[at])
    # sized with the first key's question, so that the K cases of a document share its text
    needles = sorted(zip(depths, sentences, strict=True))  # insertion order: by depth
    document, sources = _document(spec, tokenizer, needles, keys[0])
    order = [at] + [i for i in range(len(depths)) if i != at]  # the asked needle's depth first
    return NiahCase(
        spec, document, question, prefix, tuple(expected), tuple(asked),
        tuple(depths[i] for i in order), sources,
    )  # fmt: skip


def _draw_needles(spec: NiahSpec, rng: random.Random) -> tuple[list[str], list[str], list[float]]:
    """(keys, values, depths) of the needles: one key (single, multivalue) or one a needle
    (multikey, K questions), one value a needle, the depths of the needles in value order."""
    count = NEEDLES[spec.task] if spec.needles == 1 else spec.needles
    distinct = spec.task == "multikey" or spec.needles > 1
    keys = _unique(rng, count if distinct else 1, _key)
    values = _unique(rng, count, lambda r: str(r.randrange(1_000_000, 10_000_000)))
    if spec.needles > 1:
        return keys, values, list(needle_depths(spec.needles))
    return keys, values, [spec.depth] + [rng.random() for _ in range(count - 1)]


def _document(
    spec: NiahSpec, tokenizer: Tokenizer, needles: list[tuple[float, str]], first_key: str
) -> tuple[str, tuple[str, ...]]:
    """(HEADER + haystack with the needles, filler sources): the question-aware prompt with the
    first key's question has spec.length tokens (the haystack corrected twice after measuring)."""
    question, prefix = _question(spec.task, first_key)
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
    return document, haystack.sources


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
