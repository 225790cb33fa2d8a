"""Shared sentences: whole sentences that the query-agnostic cut keeps in every head.

Compressed before its question is known, a document loses its facts in a particular way on the
default model: the model-wide cut gives a few copy heads most of the budget and leaves most heads
their sinks, while answering from a fact needs its sentence in many heads (docs/eval.md, "Why 5%
of 2k fails"). Yet the probe does find the fact: ranked by the best token of the heads' mean
max-normalised probe score (cubed: `shared_sentence_rank`), the needle's sentence is among the
few best of the document in most cases of the context-only NIAH grid (docs/eval.md, "Shared
sentences"). So before the model-wide cut, the best-ranked sentences that fit in a share of the
mean head budget are kept whole in every head (as protected tokens, like the sinks); the cut
spends the rest as before.
Sentence- and chunk-level units are what SentenceKV and ChunkKV (2025) keep for the same reason:
a fact is a span, not a token.

`sentence_index` cuts a prompt into sentences from its token texts (a token that ends with
., ! or ? or holds a newline closes one); `shared_sentence_rank` ranks and picks them.
"""

from __future__ import annotations

import torch

from nanokv.tokenizer import Tokenizer

SENTENCE_ENDS = (".", "!", "?")
SHARPNESS = 3  # a head's max-normalised score is cubed before the mean over heads


def sentence_index(tokenizer: Tokenizer, ids: list[int]) -> tuple[int, ...]:
    """The sentence of each token of `ids` (0, 1, ...): a token whose text ends with
    `SENTENCE_ENDS` (trailing spaces aside) or holds a newline ends its sentence. The tokens
    after the last such token, a sentence the prompt stops inside, are -1: no sentence. That
    fragment is the prompt's most recent text, which the probe's first rows attend to whatever
    it says, so that ranked it would take the room before any fact (docs/eval.md, "Shared
    sentences")."""
    ends: dict[int, bool] = {}
    sentence, index = 0, []
    for token in ids:
        if token not in ends:
            text = tokenizer.decode([token])
            ends[token] = "\n" in text or text.rstrip().endswith(SENTENCE_ENDS)
        index.append(sentence)
        sentence += ends[token]
    return tuple(s if s < sentence else -1 for s in index)  # `sentence`: the unfinished one


def shared_sentence_rank(
    scores: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    sentence_of: torch.Tensor,
    room: int,
    sinks: int,
) -> torch.Tensor:
    """(n,) int64: each prompt position's place among the shared tokens (0 first), -1 if its
    sentence is not shared.

    scores, positions, valid: (R, C) the R heads' slots (model-wide: every layer's kv heads);
    sentence_of: (n,) the sentence of each prompt position (`sentence_index`; -1: none). A
    head's scores are divided by its largest (sinks aside), so that every head votes alike,
    and cubed (`SHARPNESS`), so that a few heads sure of a position outvote many that find it
    mildly useful: the probe's rows spread some attention over the latest sentences in most
    heads, while a fact's tokens are the largest scores of a few (docs/eval.md, "Shared
    sentences"). A position's weight is the mean over heads, a sentence's the largest of its
    positions'. Sentences are taken best first while they fit in `room` tokens (one that does
    not is passed over); sentences holding a sink are never shared (the sinks are kept
    anyway)."""
    n = sentence_of.shape[0]
    weight = position_weight(scores, positions, valid, n, sinks)  # (n,)
    in_sentence = sentence_of >= 0
    with_sinks = sentence_of[:sinks][in_sentence[:sinks]]
    sentence_of, weight = sentence_of[in_sentence], weight[in_sentence]
    sentences = int(sentence_of.max()) + 1 if sentence_of.numel() else 0
    best = torch.full((sentences,), float("-inf"), device=weight.device)
    best.scatter_reduce_(0, sentence_of, weight, "amax")
    best[with_sinks] = float("-inf")
    sizes = torch.bincount(sentence_of, minlength=sentences).tolist()
    order = [k for k in torch.argsort(-best, stable=True).tolist() if best[k] > float("-inf")]
    chosen = fit_in_room(order, [sizes[k] for k in order], room)
    places = torch.full((n,), -1, dtype=torch.int64, device=weight.device)
    places[in_sentence] = token_places(sentence_of, chosen)
    return places


def fit_in_room(units: list[int], sizes: list[int], room: int) -> list[int]:
    """The `units` (best first) taken in order while they fit in `room` tokens; one that does
    not fit is passed over, and the taking stops once the room is full."""
    chosen = []
    for unit, size in zip(units, sizes, strict=True):
        if room <= 0:
            break
        if size <= room:
            chosen.append(unit)
            room -= size
    return chosen


def position_weight(
    scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, n: int, sinks: int
) -> torch.Tensor:
    """(n,) the mean over the R heads of each position's max-normalised score to the power
    `SHARPNESS` (0 where a head does not hold the position)."""
    rows = scores.shape[0]
    positions = positions.long()
    counted = valid & (positions >= sinks) & (positions < n)
    held = scores.float().masked_fill(~counted, 0.0).clamp_min(0.0)
    normalised = held / held.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    dense = torch.zeros(rows, n, device=scores.device)  # (R, n)
    dense.scatter_reduce_(1, positions.clamp(0, max(n - 1, 0)), normalised.pow_(SHARPNESS), "amax")
    return dense.mean(dim=0)


def token_places(unit_of: torch.Tensor, chosen: list[int]) -> torch.Tensor:
    """(n,) each position's place among the tokens of the `chosen` units (sentences here, a
    conversation's turns in nanokv/turn_memory.py), taken in that order (by position within a
    unit), -1 elsewhere. unit_of: (n,) the unit of each position."""
    places = torch.full_like(unit_of, -1, dtype=torch.int64)
    taken = 0
    for unit in chosen:
        where = (unit_of == unit).nonzero().flatten()
        places[where] = torch.arange(taken, taken + where.numel(), device=places.device)
        taken += where.numel()
    return places
