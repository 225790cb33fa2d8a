"""Fidelity to the full cache on real long text, teacher-forced.

A case is a window of a standard-library text (the bundled reference manual, ``docs``, or a long
Python file, ``code``): `length` context tokens, then `tokens` continuation tokens. The context is
prefilled (and compressed), then the true continuation is fed one token at a time, so both runs
see the same tokens and only the cache differs. Against the full cache we report the top-1
agreement of the next-token predictions, the mean KL(full || policy), and for the first decoded
token the per-layer cosine similarity of the attention outputs (LaProx's Fig. 4).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanokv.engine import Engine, PromptRecord
from nanokv.eval.corpus import Document, code_files, docs_text
from nanokv.tokenizer import Tokenizer

SOURCES = ("docs", "code")
_ID = re.compile(r"^fidelity/(\w+)/L(\d+)/N(\d+)/s(\d+)$")
_CHARS_PER_TOKEN = 8  # generous: a window this many characters a token always holds enough


@dataclass(frozen=True)
class FidelitySpec:
    source: str  # docs | code
    length: int  # context tokens
    tokens: int  # continuation tokens, >= 2 (the first one is the "first decoded token")
    seed: int

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown text {self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.tokens < 2:
            raise ValueError(f"fidelity needs at least 2 continuation tokens, got {self.tokens}")

    @property
    def id(self) -> str:
        return f"fidelity/{self.source}/L{self.length}/N{self.tokens}/s{self.seed}"

    @classmethod
    def from_id(cls, case_id: str) -> FidelitySpec:
        match = _ID.match(case_id)
        if match is None:
            raise ValueError(f"{case_id!r} is not a fidelity case id (fidelity/text/L/N/s)")
        source, length, tokens, seed = match.groups()
        return cls(source, int(length), int(tokens), int(seed))


@dataclass(frozen=True)
class FidelityCase:
    spec: FidelitySpec
    text_name: str  # e.g. "stdlib/argparse.py"
    context: list[int]
    continuation: list[int]


@dataclass(frozen=True)
class Trace:
    """One teacher-forced run: next-token logits at every continuation position, and each
    layer's attention output while the first continuation token is decoded."""

    logits: torch.Tensor  # (N, vocab) float32
    first_outputs: torch.Tensor  # (L, H_q * D) float32
    kept_tokens: float  # tokens a (layer, kv head) held after prefill, on average


def make_fidelity_case(spec: FidelitySpec, tokenizer: Tokenizer) -> FidelityCase:
    """A seed-chosen window of the spec's text, starting at a line boundary."""
    rng = random.Random(spec.id)
    document = _document(spec.source, rng)
    special = tokenizer.encode("")  # BOS when the tokenizer adds one
    needed = spec.length - len(special) + spec.tokens
    span = needed * _CHARS_PER_TOKEN
    if len(document.text) < span:
        raise ValueError(f"{document.name} is too short for {needed} tokens")
    start = rng.randrange(len(document.text) - span + 1)
    start = document.text.find("\n", start) + 1 or start
    ids = tokenizer.encode(document.text[start : start + span], add_special_tokens=False)
    if len(ids) < needed:
        raise ValueError(f"{document.name} has fewer than {needed} tokens after its offset")
    context = special + ids[: spec.length - len(special)]
    continuation = ids[spec.length - len(special) : needed]
    return FidelityCase(spec, document.name, context, continuation)


def _document(source: str, rng: random.Random) -> Document:
    if source == "docs":
        return docs_text()
    files = code_files()
    return files[rng.randrange(len(files))]


@torch.inference_mode()
def teacher_force(engine: Engine, case: FidelityCase, record: PromptRecord | None = None) -> Trace:
    """Prefills the context with `engine`'s policy (from `record`, the context's recorded pass,
    when given), then feeds the true continuation."""
    n = len(case.continuation)
    state, logits = engine.start([case.context], n, records=None if record is None else [record])
    kept = float(state.arena.lengths.float().mean())
    rows, captured = [logits[0].float()], []
    for index, token in enumerate(case.continuation[:-1]):
        tokens = torch.tensor([token], device=logits.device)
        logits = engine.step(state, tokens, capture=captured if index == 0 else None)
        rows.append(logits[0].float())
    return Trace(torch.stack(rows).cpu(), torch.cat(captured).cpu(), kept)


def compare(full: Trace, other: Trace, truth: list[int]) -> dict[str, object]:
    """Top-1 agreement, mean KL(full || other), per-layer cosine of the first decoded token's
    attention outputs, and both runs' top-1 accuracy on the true continuation."""
    log_p = F.log_softmax(full.logits, dim=-1)
    log_q = F.log_softmax(other.logits, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)  # (N,)
    top_full, top_other = full.logits.argmax(-1), other.logits.argmax(-1)
    target = torch.tensor(truth)
    cosine = F.cosine_similarity(full.first_outputs, other.first_outputs, dim=-1)
    return {
        "agreement": float((top_full == top_other).float().mean()),
        "kl": float(kl.mean()),
        "cosine": [round(float(c), 6) for c in cosine],
        "accuracy": float((top_other == target).float().mean()),
        "accuracy_full": float((top_full == target).float().mean()),
    }
