"""The eviction stage of the decode loop: budgets per sequence, policy scores -> kept slots after
each prefill layer, the model-wide selection of `global` and `layerwise` allocations, and
multi-step eviction during decode. The engine calls it; only the arena moves data."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from nanokv.arena import KVArena
from nanokv.budget import Budget
from nanokv.information import weigh
from nanokv.policies import Policy, PromptLayer
from nanokv.policies.allocation import (
    MODEL_WIDE,
    kept_slots,
    pyramid_budgets,
    select_across_rows,
    select_layer_widths,
)
from nanokv.policies.selection import protection_rank, select_prompt_tokens, select_victims
from nanokv.recompress import kept_to_budget
from nanokv.reconstruct import fold_victims, reconstruct_prefill
from nanokv.sentences import shared_sentence_rank
from nanokv.turn_memory import TurnMemory


@dataclass(frozen=True)
class SequencePlan:
    """How many prompt tokens the kv heads of one sequence keep."""

    prompt_length: int
    keep_all: bool  # the budget covers prompt + new tokens: nothing is ever evicted
    layer_counts: tuple[int, ...]  # per layer, tokens a head keeps (its mean for layer/global)
    head_cap: int  # most tokens one head may hold outside the decode window
    head_floor: int = 0  # fewest prompt tokens one head keeps (the budget's floor, see plan)


@dataclass(frozen=True)
class PrefillSelection:
    kept: torch.Tensor  # (H_kv, m) prompt indices, ascending, padded past each head's count
    counts: torch.Tensor  # (H_kv,)
    scores: torch.Tensor  # (H_kv, n) the policy's prompt scores
    state: dict[str, torch.Tensor]  # name -> (H_kv, n) the policy's extra per-slot statistics


class EvictionStage:
    """Joins a policy, a budget and an allocation rule; times everything it does."""

    def __init__(self, policy: Policy, budget: Budget, num_layers: int) -> None:
        self.policy, self.budget, self.num_layers = policy, budget, num_layers
        self.options = policy.options
        self.seconds = 0.0
        if self.reconstructs and self.options.allocation in MODEL_WIDE:
            raise ValueError(
                f"{policy.name}'s reconstructed slot needs a per-layer allocation; use "
                "--allocation uniform, pyramid or layer (or turn reconstruction off)"
            )

    def plan(self, prompt_length: int, max_new_tokens: int) -> SequencePlan:
        """The per-layer counts of one sequence. With a budget floor, no head keeps fewer than
        the floor, nor fewer than the tokens the selection protects (sinks, observation
        window, reconstructed slot); a sequence that fits under it is never evicted."""
        n, total = prompt_length, prompt_length + max_new_tokens
        floor = self._head_floor()
        cache = max(self.budget.cache_tokens(n, max_new_tokens), floor)
        if not self.policy.evicts or cache >= total:
            return SequencePlan(n, True, (total,) * self.num_layers, total)
        allocation = self.options.allocation
        counts, cap = (cache,) * self.num_layers, cache
        if allocation == "pyramid":
            protected = self.options.sinks + self.options.observation_window
            counts = pyramid_budgets(cache, self.num_layers, min(protected, cache))
            counts = tuple(max(count, floor) for count in counts)
            cap = max(counts)
        elif allocation in ("layer", *MODEL_WIDE):
            # a head may take up to max_head_share of the mean, never more than the prompt
            cap = min(math.ceil(self.options.max_head_share * cache), max(cache, n))
        return SequencePlan(n, False, counts, cap, min(floor, n))

    def is_floored(self, prompt_length: int) -> bool:
        """True when the floor, not the budget, sets the cache of a prompt this long."""
        if self.budget.value == 1.0 or not self.policy.evicts:
            return False
        return self._head_floor() > self.budget.tokens(prompt_length)

    def describe(self, prompt_length: int, max_new_tokens: int) -> str:
        """One line for `--verbose`: the budget in tokens, the cache floor, and which set the
        cache of a prompt this long."""
        budget = self.budget
        if not self.policy.evicts or budget.value == 1.0:
            return "budget: everything kept (no eviction)"
        plan = self.plan(prompt_length, max_new_tokens)
        asked, floor = budget.tokens(prompt_length), self._head_floor()
        line = f"budget {budget.value:g}: {asked} tokens a head of {prompt_length}"
        line += f"; cache floor {floor}" if floor else "; no cache floor (exact budget)"
        if plan.keep_all:
            return line + f": prompt + {max_new_tokens} new tokens fit under it, nothing evicted"
        if floor > asked:
            return line + f": the floor sets the cache ({plan.layer_counts[0]} tokens a head)"
        return line

    def _head_floor(self) -> int:
        """Tokens no head is cut below: 0 without a budget floor (the budget is exact)."""
        if self.budget.floor == 0:
            return 0
        protected = self.options.sinks + self.options.observation_window + int(self.reconstructs)
        return max(self.budget.floor, protected)

    def select_prefill(self, prompt: PromptLayer, plan: SequencePlan) -> PrefillSelection | None:
        """Kept prompt tokens of one layer (global: provisional, the best `head_cap` per head);
        None when nothing will ever be evicted."""
        if plan.keep_all:
            return None
        start = time.perf_counter()
        scores = self.policy.prefill_scores(prompt).float()  # (H_kv, n)
        kept, counts = self._kept(prompt, plan, scores)
        self.seconds += time.perf_counter() - start
        return PrefillSelection(kept, counts, scores, self.policy.prefill_state(prompt))

    def _kept(
        self, prompt: PromptLayer, plan: SequencePlan, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept (H_kv, m), counts (H_kv,)) of one layer under the allocation rule."""
        n, planned = prompt.positions.shape[0], plan.layer_counts[prompt.layer]
        count = planned - self._reserved(n, planned)
        heads = scores.shape[0]
        if n <= count:
            kept = torch.arange(n, device=scores.device).expand_as(scores)
        elif self.options.allocation == "layer":
            keep = select_across_rows(
                scores, self._protection_rank(prompt.positions, n).expand_as(scores),
                torch.ones_like(scores, dtype=torch.bool), total=count * heads,
                floor=self._floor(count, plan), cap=plan.head_cap, protect_limit=count,
            )  # fmt: skip
            return kept_slots(keep)
        else:
            width = plan.head_cap if self.options.allocation in MODEL_WIDE else count
            kept = self._top(scores, width)
        return kept, torch.full((heads,), kept.shape[1], device=scores.device)

    def _reserved(self, n: int, count: int) -> int:
        """1 when the policy keeps a reconstructed slot and this layer evicts prompt tokens."""
        return int(self.reconstructs and n > count)

    @property
    def reconstructs(self) -> bool:
        """The policy keeps a reconstructed slot of what each head dropped (AUV)."""
        return self.policy.reconstructs and self.options.reconstruct

    def after_fill(
        self, arena: KVArena, prompt: PromptLayer, plan: SequencePlan, chosen: PrefillSelection
    ) -> None:
        """Writes the reconstructed slot of what this layer's selection dropped, after each
        head's kept tokens (reconstruct.py computes it, the stage writes it)."""
        n = prompt.positions.shape[0]
        if not self._reserved(n, plan.layer_counts[prompt.layer]):
            return
        start = time.perf_counter()
        dropped = torch.ones_like(chosen.scores, dtype=torch.bool)
        valid = torch.arange(chosen.kept.shape[1]) < chosen.counts.unsqueeze(-1)
        dropped.scatter_(-1, chosen.kept, ~valid & dropped.gather(-1, chosen.kept))
        weights = chosen.scores.clamp_min(0) * dropped
        rcs = reconstruct_prefill(prompt.k, prompt.v, weights)
        layer, seq = prompt.layer, prompt.seq
        slot = arena.lengths[layer, seq].long()  # (H_kv,): right after the kept tokens
        arena.write_slot(layer, seq, slot, rcs.k, rcs.v, rcs.pos, score=rcs.weight)
        arena.set_lengths(layer, (slot + 1).view(1, -1), seq=seq)
        self.seconds += time.perf_counter() - start

    def _top(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        window = self.options.observation_window
        return select_prompt_tokens(scores, count, sinks=self.options.sinks, window=window)

    def _protection_rank(self, positions: torch.Tensor, n: int) -> torch.Tensor:
        window = self.options.observation_window
        return protection_rank(positions, n, self.options.sinks, window)

    def _floor(self, count: int, plan: SequencePlan) -> int:
        """Tokens every head keeps under a layer/global allocation: AdaKV's share of the mean
        budget, and never fewer than the plan's head floor."""
        return max(int(self.options.min_head_share * count), min(plan.head_floor, count))

    def cuts_after_prefill(self, plan: SequencePlan) -> bool:
        """True when the final selection of a prompt waits for its last layer (`global`,
        `layerwise`) and evicts some of it."""
        if self.options.allocation not in MODEL_WIDE or plan.keep_all:
            return False
        return plan.prompt_length > plan.layer_counts[0]

    def weighs_information(self, plan: SequencePlan) -> bool:
        """True when `finish_prefill` wants the prompt tokens' self-information."""
        return self.options.information and self.cuts_after_prefill(plan)

    def finish_prefill(
        self,
        arena: KVArena,
        seq: int,
        plan: SequencePlan,
        information: torch.Tensor | None = None,
        sentence_of: tuple[int, ...] = (),
    ) -> None:
        """`global` allocation: one top-k over every layer's and head's provisional tokens,
        then each head is compacted to its share; `layerwise`: one top-k over layer widths.
        Other allocations are already final. `information` (n,) multiplies each prompt token's
        score first (nanokv/information.py); with the `sentences` option, the best sentences
        of `sentence_of` (the sentence of each prompt token) are kept in every head first
        (nanokv/sentences.py)."""
        if not self.cuts_after_prefill(plan):
            return
        start = time.perf_counter()
        scores = arena.score[:, seq]  # (L, H_kv, C)
        if information is not None:
            scores = weigh(scores, arena.pos[:, seq], information)
        shared = self._shared_sentences(arena, seq, scores, plan, sentence_of)
        self._select_across(arena, seq, scores, plan, range(len(arena.k)), shared)
        self.seconds += time.perf_counter() - start

    def _shared_sentences(
        self,
        arena: KVArena,
        seq: int,
        scores: torch.Tensor,
        plan: SequencePlan,
        sentence_of: tuple[int, ...],
    ) -> torch.Tensor | None:
        """(n,) each prompt position's place among the shared sentences' tokens (-1: not
        shared), or None without the option or the sentences."""
        if not self.options.sentences or len(sentence_of) != plan.prompt_length:
            return None
        pos, valid = _held_slots(arena, seq)  # (L, H_kv, C) each
        room = int(self.options.sentences * plan.layer_counts[0])
        return shared_sentence_rank(
            scores.flatten(0, 1), pos.flatten(0, 1), valid.flatten(0, 1),
            torch.tensor(sentence_of, device=pos.device), room, self.options.sinks,
        )  # fmt: skip

    def reselect(
        self, arena: KVArena, seq: int, scores: torch.Tensor, cache: int, seen: int
    ) -> None:
        """Brings a live sequence (a conversation) back to `cache` slots a head on average,
        ranked by `scores` (L, H_kv, C) under the policy's allocation: `global` picks across
        every layer and head, `layer` across the heads of each layer, otherwise every head keeps
        its own best `cache` (pyramid too: a conversation has no prompt to slope). The sinks and
        the last `observation_window` of the `seen` positions are protected. A conversation
        with a turn memory recompresses with `keep_turns` instead."""
        start = time.perf_counter()
        options, num_layers = self.options, len(arena.k)
        cap = max(math.ceil(options.max_head_share * cache), cache)
        plan = SequencePlan(seen, False, (cache,) * num_layers, cap)
        if options.allocation in MODEL_WIDE:
            self._select_across(arena, seq, scores, plan, range(num_layers))
        elif options.allocation == "layer":
            for layer in range(num_layers):
                self._select_across(arena, seq, scores, plan, range(layer, layer + 1))
        else:
            for layer in range(num_layers):
                view = arena.layer(layer)
                kept, counts = kept_to_budget(
                    scores[layer], view.pos[seq], view.lengths[seq], cache, sinks=options.sinks,
                    window=options.observation_window, seen=seen,
                )  # fmt: skip
                arena.compact_sequence(layer, seq, kept, counts)
        self.seconds += time.perf_counter() - start

    def keep_turns(
        self,
        arena: KVArena,
        seq: int,
        scores: torch.Tensor,
        cache: int,
        memory: TurnMemory,
        sentence_of: tuple[int, ...],
    ) -> None:
        """Brings a conversation back to `cache` slots in every (layer, kv head), the same
        positions in each: the sinks, the units `memory` ranks best under `scores` (L, H_kv, C)
        in its share of the room, then the most recent positions (nanokv/turn_memory.py).
        sentence_of: the sentence of each position seen."""
        start = time.perf_counter()
        pos, valid = _held_slots(arena, seq)  # (L, H_kv, C) each
        lengths = arena.lengths[:, seq].long()  # (L, H_kv)
        sentences = torch.tensor(sentence_of, dtype=torch.int64, device=pos.device)
        places = memory.shared_places(
            scores.flatten(0, 1), pos.flatten(0, 1), valid.flatten(0, 1), sentences, cache
        )  # (seen,)
        seen, recent = len(sentence_of), cache - self.options.sinks - memory.room(cache)
        held = pos.long().clamp(0, max(seen - 1, 0))
        shared = torch.where(pos >= 0, places[held], -1)
        rank = (2 * seen - shared).float()  # above every position: units in their places
        ranked = torch.where(shared >= 0, rank, pos.float())  # then the most recent
        for layer in range(len(arena.k)):
            kept, counts = kept_to_budget(
                ranked[layer], pos[layer], lengths[layer], cache, sinks=self.options.sinks,
                window=recent, seen=seen,
            )  # fmt: skip
            arena.compact_sequence(layer, seq, kept, counts)
        self.seconds += time.perf_counter() - start

    def _select_across(
        self,
        arena: KVArena,
        seq: int,
        scores: torch.Tensor,
        plan: SequencePlan,
        layers: range,
        shared: torch.Tensor | None = None,
    ) -> None:
        """One top-k of the plan's mean count a head over every head of `layers` of `seq`
        (`layerwise`: over the layers' widths), ranked by scores (L, H_kv, C); each head is
        compacted to what it won. `shared` (n,): places of prompt positions every head keeps
        after its protected ones, in that order (-1: none; `_shared_sentences`)."""
        mean, n = plan.layer_counts[0], plan.prompt_length
        chosen = slice(layers.start, layers.stop)
        pos, valid = _held_slots(arena, seq, chosen)  # (l, H_kv, C) each
        protected, total = self._protection_rank(pos, n), mean * math.prod(valid.shape[:2])
        if shared is not None:
            protected = self._with_shared(protected, pos, shared)
        if self.options.allocation == "layerwise":
            keep = select_layer_widths(
                scores[chosen], protected, valid, total, floor=self._floor(mean, plan),
                cap=plan.head_cap, protect_limit=mean,
            )  # fmt: skip
        else:
            keep = select_across_rows(
                scores[chosen].flatten(0, 1), protected.flatten(0, 1), valid.flatten(0, 1),
                total=total, floor=self._floor(mean, plan), cap=plan.head_cap,
                protect_limit=mean,
            ).view_as(valid)  # fmt: skip
        for index, layer in enumerate(layers):
            kept, counts = kept_slots(keep[index])
            arena.compact_sequence(layer, seq, kept, counts)

    def _with_shared(
        self, protected: torch.Tensor, pos: torch.Tensor, shared: torch.Tensor
    ) -> torch.Tensor:
        """The protection rank (l, H_kv, C) with the `shared` positions (n,) protected after
        the sinks and the window, in their places."""
        after = self.options.sinks + self.options.observation_window
        held = pos.long()
        place = shared[held.clamp(0, shared.shape[0] - 1)]
        place = torch.where((held >= 0) & (held < shared.shape[0]), place, -1)
        return torch.where((protected < 0) & (place >= 0), after + place, protected)

    def cache_tokens(self, plan: SequencePlan, lengths: torch.Tensor) -> torch.Tensor:
        """(L, H_kv) tokens each head holds after every decode-time eviction, given the
        (L, H_kv) lengths prefill left: what the selection kept, or the planned count when the
        prompt was shorter than it."""
        planned = torch.tensor(plan.layer_counts, device=lengths.device).unsqueeze(1)
        if plan.keep_all:
            return planned.expand_as(lengths).clone()
        if self.options.allocation in ("layer", *MODEL_WIDE) and plan.prompt_length > planned[0]:
            return lengths.clone()
        return torch.maximum(lengths, planned)

    def evict(
        self, arena: KVArena, layer: int, cache: torch.Tensor, window: int, full: torch.Tensor
    ) -> None:
        """Multi-step eviction (AUV's memory management): the sequences marked `full` (B,) have
        written W tokens past their cache size; the policy's W lowest-scoring slots outside the
        window are freed and the window's tokens are scattered into them: no growth, no
        fragmentation. cache: (B, H_kv) tokens each head keeps after an eviction."""
        start = time.perf_counter()
        lengths = arena.lengths[layer].long()  # (B, H_kv)
        view = arena.layer(layer)
        slots = torch.arange(view.pos.shape[-1], device=cache.device).view(1, 1, -1)
        candidates = slots < cache.unsqueeze(-1)  # (B, H_kv, C): outside the decode window
        scores = self.policy.eviction_scores(layer, view)
        victims = select_victims(scores, view.pos, candidates, window, self.options.sinks)
        window_slots = cache.unsqueeze(-1) + torch.arange(window, device=cache.device)
        is_full = full.view(-1, 1, 1)
        marked = torch.where(is_full, victims, -1)
        self.write_rows(arena, layer, self.policy.before_eviction(layer, view, marked))
        folded = fold_victims(view, victims, full) if self.reconstructs else None
        if folded is not None:  # the reconstructed slots absorb the victims before they go
            arena.overwrite_slots(layer, folded.slot, folded.k, folded.v, folded.weight)
        arena.scatter(layer, torch.where(is_full, window_slots, victims), victims)
        arena.set_lengths(layer, torch.where(full.unsqueeze(1), cache, lengths))
        self.seconds += time.perf_counter() - start

    def write_rows(self, arena: KVArena, layer: int, rows: dict[str, torch.Tensor] | None) -> None:
        """Writes what a policy returned (`observe_decode`, `before_eviction`): slot-state name
        -> new (B, H_kv, C) values of `layer`. Policies compute, the stage writes; None or an
        empty dict changes nothing."""
        if rows:
            arena.set_slot_state(layer, rows)


def _held_slots(
    arena: KVArena, seq: int, layers: slice = slice(None)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions (l, H_kv, C) of sequence `seq`'s slots in `layers` and which of those
    slots hold a token (bool, the same shape): what every selection over an arena reads."""
    pos = arena.pos[layers, seq]
    lengths = arena.lengths[layers, seq].long().unsqueeze(-1)  # (l, H_kv, 1)
    return pos, torch.arange(arena.capacity, device=pos.device) < lengths
