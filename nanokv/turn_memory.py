"""A conversation's memory of whole turns: what every head keeps across recompressions.

After each answer a conversation is compressed back to its budget before the next question is
known (nanokv/conversation.py). On the chat suite, the model-wide per-head cut that serves a
document well loses the conversation's facts: it leaves every head a different scatter of
fragments of the earlier turns, and the model answers from those fragments ("the locker code of
<name> is a Python function", after eight turns on Python's documentation). Kept whole in every
head, next to the latest tokens, the turn that stated the fact is recalled; the same turn next
to the per-head cut's fragments is not, and twice the budget of fragments does worse
(docs/eval.md, "A conversation's memory of whole turns").

So a conversation whose policy shares sentences (the `sentences` option, under KVzip's probe)
recompresses into one set of positions that every (layer, kv head) keeps:

- the sinks;
- whole units, best first, in a share of the room (`sentences` of the cache less the sinks): a
  unit is one span the conversation wrote (a user turn as the chat template rendered it, or an
  answer) when it fits in that share, otherwise each of the span's sentences; sink positions
  belong to no unit. A unit ranks by its best token's weight under KVzip's probe
  (`sentences.position_weight`: the heads' cubed max-normalised scores, averaged) and
  remembers the best weight it ever had: a turn the probe found important once is not dropped
  because a later probe of the same arena attends elsewhere (`TurnMemory.best`). Only units
  that every head still holds whole are candidates;
- the rest of the cache, the most recent positions.
"""

from __future__ import annotations

import torch

from nanokv.sentences import fit_in_room, position_weight, token_places


class TurnMemory:
    """The spans a conversation wrote and the best weight each of its units has had."""

    def __init__(self, share: float, sinks: int) -> None:
        """`share`: the part of a head's room (the cache less the sinks) that whole units take;
        the rest holds the latest positions."""
        self.share, self.sinks = share, sinks
        self.span_starts: list[int] = []  # first position of each span, ascending
        self.best: dict[int, float] = {}  # unit (its first position) -> best weight so far

    def begin_span(self, position: int) -> None:
        """The conversation starts writing a turn or an answer at `position`."""
        if self.span_starts and position <= self.span_starts[-1]:
            raise ValueError(f"span at {position} does not follow {self.span_starts[-1]}")
        self.span_starts.append(position)

    def room(self, cache: int) -> int:
        """Positions of a head that whole units may take."""
        return int(self.share * max(cache - self.sinks, 0))

    def shared_places(
        self,
        scores: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        sentence_of: torch.Tensor,
        cache: int,
    ) -> torch.Tensor:
        """(n,) int64: each of the n positions seen, its place among the shared units' tokens
        (0 first), -1 when not shared. scores, positions, valid: (R, C) every (layer, kv head)'s
        slots; sentence_of: (n,) the sentence of each position (`sentences.sentence_index`)."""
        n, room = sentence_of.shape[0], self.room(cache)
        unit_of = self.units(sentence_of, room, recent=cache - self.sinks - room)
        weight = position_weight(scores, positions, valid, n, self.sinks)  # (n,)
        whole = _held_by_every_head(positions, valid, n)  # (n,) bool
        ranked = self._remember(unit_of, weight, whole)  # [(best, first position, size)]
        chosen = fit_in_room([first for _, first, _ in ranked], [size for *_, size in ranked], room)
        return token_places(unit_of, chosen)

    def units(self, sentence_of: torch.Tensor, room: int, recent: int) -> torch.Tensor:
        """(n,) int64: the unit of each position, named by its first position; -1 for the
        sinks, the `recent` latest positions (kept anyway) and a sentence the conversation
        stops inside. A span ending before the recent positions that fits in `room` is one
        unit, any other span's part before them one unit a sentence."""
        n = sentence_of.shape[0]
        unit_of = torch.full((n,), -1, dtype=torch.int64, device=sentence_of.device)
        tail = max(n - recent, 0)
        ends = [*self.span_starts[1:], n]
        for span_start, span_end in zip(self.span_starts, ends, strict=True):
            start, end = max(span_start, self.sinks), min(span_end, tail)
            if start >= end:
                continue
            whole = span_end <= tail and end - start <= room
            unit_of[start:end] = self._span_units(sentence_of[start:end], start, whole=whole)
        return unit_of

    @staticmethod
    def _span_units(sentences: torch.Tensor, start: int, *, whole: bool) -> torch.Tensor:
        """The units of one span's positions [start, start + len): one unit when `whole`,
        otherwise one a sentence (-1 where no sentence ends)."""
        if whole:
            return torch.full_like(sentences, start, dtype=torch.int64)
        index = torch.arange(start, start + sentences.shape[0], device=sentences.device)
        changed = torch.ones_like(sentences, dtype=torch.bool)
        changed[1:] = sentences[1:] != sentences[:-1]
        first = torch.cummax(torch.where(changed, index, 0), dim=0).values
        return torch.where(sentences >= 0, first, -1)

    def _remember(
        self, unit_of: torch.Tensor, weight: torch.Tensor, whole: torch.Tensor
    ) -> list[tuple[float, int, int]]:
        """(best weight, first position, size) of every unit every head holds whole, best
        first (ties: the earlier unit); each unit's best weight is updated."""
        in_unit = unit_of >= 0
        firsts, inverse, sizes = torch.unique(
            unit_of[in_unit], return_inverse=True, return_counts=True
        )
        count = firsts.shape[0]
        best = torch.full((count,), float("-inf"), device=weight.device)
        best.scatter_reduce_(0, inverse, weight[in_unit], "amax")
        held = torch.ones(count, dtype=torch.bool, device=weight.device)
        held.scatter_reduce_(0, inverse, whole[in_unit], "amin")
        ranked = []
        for first, now, size, kept in zip(
            firsts.tolist(), best.tolist(), sizes.tolist(), held.tolist(), strict=True
        ):
            self.best[first] = max(self.best.get(first, now), now)
            if kept:
                ranked.append((self.best[first], first, size))
        ranked.sort(key=lambda unit: (-unit[0], unit[1]))
        return ranked


def _held_by_every_head(positions: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) bool: every one of the R heads holds the position (positions, valid: (R, C))."""
    counts = torch.zeros(n, dtype=torch.int64, device=positions.device)
    held = positions[valid].long()
    counts.index_add_(0, held.clamp(0, n - 1), torch.ones_like(held))
    return counts == positions.shape[0]
