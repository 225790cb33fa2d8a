"""Haystacks: filler sentences up to a token count, with needle sentences at chosen depths.

Filler is either RULER's repeated neutral sentences ("The grass is green. ...") or real prose
(`corpus.prose_sentences`, from a seed-chosen offset). A haystack is built in whole sentences,
joined by single spaces, so its token count is the sum of the sentences' counts (byte-level BPE
does not merge across a space-led word); the last sentence is cut at a word to fit. Needles go
between sentences, at the boundary closest to `depth` x the haystack's tokens (RULER's depth).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from nanokv.eval.corpus import prose_sentences

FILLERS = ("neutral", "prose")
NEUTRAL = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)  # RULER's noise haystack

Counter = Callable[[str], int]  # tokens of a text fragment that follows a space


@dataclass(frozen=True)
class Haystack:
    text: str
    tokens: int  # filler tokens (needles excluded), by the additive count
    sources: tuple[str, ...]  # where the filler came from


def filler_stream(filler: str, seed: int) -> Iterator[tuple[str, str]]:
    """Endless (sentence, source) pairs: neutral sentences, or prose from a seed-chosen
    offset (the same seed gives the same haystack at every length and depth)."""
    if filler == "neutral":
        while True:
            for sentence in NEUTRAL:
                yield sentence, "RULER neutral sentences"
    elif filler == "prose":
        sentences = prose_sentences()
        index = random.Random(f"prose/{seed}").randrange(len(sentences))
        while True:
            yield sentences[index].text, sentences[index].source
            index = (index + 1) % len(sentences)
    else:
        raise ValueError(f"unknown filler {filler!r}; choose one of {', '.join(FILLERS)}")


def build_haystack(
    stream: Iterator[tuple[str, str]],
    tokens: int,
    needles: list[tuple[float, str]],
    count: Counter,
) -> Haystack:
    """`tokens` of filler from `stream` with each (depth, sentence) needle inserted at the
    sentence boundary closest to depth x tokens (needles at the same boundary keep their order)."""
    pieces, counts, sources = _take(stream, max(tokens, 0), count)
    starts = [sum(counts[:i]) for i in range(len(pieces) + 1)]  # tokens before boundary i
    placed: dict[int, list[str]] = {}
    for depth, needle in needles:
        boundary = min(range(len(starts)), key=lambda i: (abs(starts[i] - depth * tokens), i))
        placed.setdefault(boundary, []).append(needle)
    parts = []
    for index in range(len(pieces) + 1):
        parts += placed.get(index, [])
        if index < len(pieces):
            parts.append(pieces[index])
    return Haystack(" ".join(parts), sum(counts), tuple(dict.fromkeys(sources)))


def _take(
    stream: Iterator[tuple[str, str]], tokens: int, count: Counter
) -> tuple[list[str], list[int], list[str]]:
    """Whole sentences up to `tokens`, the last one cut at a word boundary to fit."""
    pieces, counts, sources, total = [], [], [], 0
    while total < tokens:
        sentence, source = next(stream)
        size = count(" " + sentence)
        if total + size > tokens:
            sentence = _cut(sentence, tokens - total, count)
            size = count(" " + sentence) if sentence else 0
            if not sentence:
                break
        pieces.append(sentence)
        counts.append(size)
        sources.append(source)
        total += size
    return pieces, counts, sources


def _cut(sentence: str, tokens: int, count: Counter) -> str:
    """The longest word prefix of `sentence` with at most `tokens` tokens."""
    words = sentence.split(" ")
    low, high = 0, len(words)
    while low < high:  # largest k with count(first k words) <= tokens
        mid = (low + high + 1) // 2
        if count(" " + " ".join(words[:mid])) <= tokens:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[:low])
