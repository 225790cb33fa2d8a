"""Code completion, LongBench-LCC-like: a long standard-library Python file cut at a random line
boundary; the model completes the next line greedily from the `length` tokens before the cut;
the score is the edit similarity to the true line (1 - Levenshtein distance / longer length).

The prompt is the raw code (no chat template): a completion, as on a code model. It stops at
the end of the line before the target, without its newline: byte-level BPE merges a newline
with the next line's indentation ("\n       " is one token), so a prompt that ends in a bare
newline is a token sequence the model has rarely seen (SmolLM2 answers it with "#"). The
prediction is the first non-blank line after the first generated newline. A case id,
``code/L<tokens>/s<seed>``, picks the file and the line.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from nanokv.engine import Sequence
from nanokv.eval.corpus import code_files
from nanokv.stopping import StopChecker
from nanokv.tokenizer import Tokenizer

_ID = re.compile(r"^code/L(\d+)/s(\d+)$")
_MIN_LINE_CHARS = 4  # a target line has some content ("pass" counts, ")" does not)


@dataclass(frozen=True)
class CodeSpec:
    length: int  # prompt tokens, at most
    seed: int

    @property
    def id(self) -> str:
        return f"code/L{self.length}/s{self.seed}"

    @classmethod
    def from_id(cls, case_id: str) -> CodeSpec:
        match = _ID.match(case_id)
        if match is None:
            raise ValueError(f"{case_id!r} is not a code case id (code/L/s)")
        return cls(int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True)
class CodeCase:
    spec: CodeSpec
    file: str
    line_number: int  # 1-based line of the target in the file
    prompt: list[int]  # token ids of the code before the target line, without its last newline
    target: str  # the true next line, stripped


def make_code_case(spec: CodeSpec, tokenizer: Tokenizer) -> CodeCase:
    """The file and cut the spec's id selects; the prompt is the longest run of whole lines
    before the cut that fits `length` tokens."""
    rng = random.Random(spec.id)
    files = code_files()
    document = files[rng.randrange(len(files))]
    lines = document.text.splitlines(keepends=True)
    special = tokenizer.encode("")
    room = spec.length - len(special)

    def tokens(first: int, last: int) -> int:
        return len(tokenizer.encode("".join(lines[first:last]), add_special_tokens=False))

    earliest = _smallest(lambda cut: tokens(0, cut) >= room, len(lines))
    candidates = [
        i for i in range(earliest, len(lines)) if len(lines[i].strip()) >= _MIN_LINE_CHARS
    ]
    if not candidates:
        raise ValueError(f"{document.name} is too short for {spec.length}-token prompts")
    cut = rng.choice(candidates)
    first = _smallest(lambda start: tokens(start, cut) <= room, cut)
    text = "".join(lines[first:cut]).rstrip("\n")
    prompt = special + tokenizer.encode(text, add_special_tokens=False)
    return CodeCase(spec, document.name, cut + 1, prompt, lines[cut].strip())


def _smallest(predicate, upper: int) -> int:
    """Smallest k in [0, upper] with predicate(k) true (predicate monotone), upper if none."""
    low, high = 0, upper
    while low < high:
        mid = (low + high) // 2
        if predicate(mid):
            high = mid
        else:
            low = mid + 1
    return low


class FirstLine(StopChecker):
    """Stops a completion once a non-blank line after its first newline is complete."""

    def advance(self, seq: Sequence, token: int, is_last: bool) -> str:
        delta = super().advance(seq, token, is_last)
        complete = seq.text.split("\n")[1:-1]  # new lines already ended by a newline
        if seq.finish_reason is None and any(line.strip() for line in complete):
            seq.finish_reason = "stop"
        return delta


def first_line(text: str) -> str:
    """The first non-blank line after the first newline of a completion (what precedes it
    ends the prompt's last line), stripped."""
    new_lines = text.split("\n")[1:]
    return next((line.strip() for line in new_lines if line.strip()), "")


def edit_similarity(predicted: str, truth: str) -> float:
    """1 - Levenshtein(predicted, truth) / max(len): 1.0 for equal strings, 0.0 for disjoint."""
    if not predicted and not truth:
        return 1.0
    previous = list(range(len(truth) + 1))
    for i, a in enumerate(predicted, 1):
        current = [i]
        for j, b in enumerate(truth, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b)))
        previous = current
    return 1.0 - previous[-1] / max(len(predicted), len(truth))
