"""EvictionStage.reselect: a live arena (a conversation) brought back to its budget under the
policy's allocation, checked against a brute-force selection written here from the rule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanokv.arena import KVArena
from nanokv.budget import Budget
from nanokv.eviction import EvictionStage
from nanokv.policies import make_policy

LAYERS, KV_HEADS, DIM = 3, 2, 4


def live_arena(
    lengths: torch.Tensor, capacity: int, seed: int, gaps: bool = True
) -> tuple[KVArena, torch.Tensor]:
    """An arena whose heads hold `lengths` (L, H_kv) slots in position order (with `gaps`
    between positions, as after earlier compressions) and random (L, H_kv, C) scores."""
    generator = torch.Generator().manual_seed(seed)
    arena = KVArena(LAYERS, 1, KV_HEADS, capacity, DIM, dtype=torch.float32)
    scores = torch.rand(LAYERS, KV_HEADS, capacity, generator=generator)
    for layer in range(LAYERS):
        for head in range(KV_HEADS):
            count = int(lengths[layer, head])
            steps = torch.randint(1, 4 if gaps else 2, (count,), generator=generator)
            arena.pos[layer, 0, head, :count] = (steps.cumsum(0) - 1).int()
            arena.k[layer, 0, head, :count] = arena.pos[layer, 0, head, :count, None].float()
        arena.set_lengths(layer, lengths[layer].view(1, -1).int())
    return arena, scores


def held(arena: KVArena) -> set[tuple[int, int, int]]:
    """(layer, head, position) of every valid slot; K carries the position, so a moved slot
    must still hold its own vector."""
    out = set()
    for layer in range(LAYERS):
        for head in range(KV_HEADS):
            count = int(arena.lengths[layer, 0, head])
            pos = arena.pos[layer, 0, head, :count]
            assert torch.equal(arena.k[layer, 0, head, :count, 0], pos.float())
            assert bool((pos[1:] > pos[:-1]).all()), "slots stay in position order"
            out |= {(layer, head, int(p)) for p in pos}
    return out


def expected_global(
    arena: KVArena, scores: torch.Tensor, cache: int, sinks: int, cap: int
) -> set[tuple[int, int, int]]:
    """The rule, brute force: every head keeps its sinks; the rest of cache x heads goes to the
    highest scores over all heads (ties by row, then slot), no head above `cap`."""
    kept, candidates = set(), []
    for layer in range(LAYERS):
        for head in range(KV_HEADS):
            row = layer * KV_HEADS + head
            for slot in range(int(arena.lengths[layer, 0, head])):
                position = int(arena.pos[layer, 0, head, slot])
                if position < sinks:
                    kept.add((layer, head, position))
                else:
                    score = float(scores[layer, head, slot])
                    candidates.append((-score, row, slot, (layer, head, position)))
    per_head = {(layer, head): 0 for layer in range(LAYERS) for head in range(KV_HEADS)}
    for layer, head, _ in kept:
        per_head[(layer, head)] += 1
    room = cache * LAYERS * KV_HEADS - len(kept)
    for _, _, _, entry in sorted(candidates):
        if room == 0:
            break
        if per_head[entry[:2]] < cap:
            kept.add(entry)
            per_head[entry[:2]] += 1
            room -= 1
    return kept


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    cache=st.integers(4, 12),
    share=st.sampled_from([1.0, 2.0, 4.0]),
    extra=st.lists(st.integers(0, 20), min_size=LAYERS * KV_HEADS, max_size=LAYERS * KV_HEADS),
)
def test_global_reselect_is_one_model_wide_top_k(seed, cache, share, extra):
    lengths = (cache + torch.tensor(extra)).view(LAYERS, KV_HEADS)
    arena, scores = live_arena(lengths, int(lengths.max()) + 2, seed)
    policy = make_policy("laprox", allocation="global", max_head_share=share, observe="repeat")
    stage = EvictionStage(policy, Budget(0.5), LAYERS)
    cap = max(int(share * cache + 0.999999), cache)
    want = expected_global(arena, scores, cache, policy.options.sinks, cap)
    before = held(arena)
    stage.reselect(arena, 0, scores, cache, seen=10_000)
    after = held(arena)
    assert after <= before, "only held tokens are kept"
    assert after == want
    assert len(after) == min(cache * LAYERS * KV_HEADS, len(before))


def test_layer_reselect_keeps_each_layers_total_and_moves_budget_between_its_heads():
    lengths = torch.tensor([[20, 20], [20, 20], [20, 20]])
    arena, scores = live_arena(lengths, 22, seed=3, gaps=False)
    scores[:, 0] += 10.0  # head 0 of every layer outranks head 1
    policy = make_policy("snapkv", allocation="layer", observe="repeat", sinks=2)
    EvictionStage(policy, Budget(0.5), LAYERS).reselect(arena, 0, scores, 6, seen=10_000)
    per_head = arena.lengths[:, 0]
    assert per_head.sum(dim=1).tolist() == [12, 12, 12]
    assert per_head[:, 0].tolist() == [10, 10, 10]  # its 2 sinks and the 8 others left
    assert per_head[:, 1].tolist() == [2, 2, 2]  # only its sinks


@pytest.mark.parametrize("allocation", ["uniform", "pyramid"])
def test_per_head_reselect_keeps_every_heads_best(allocation):
    lengths = torch.tensor([[20, 9], [20, 20], [15, 20]])
    arena, scores = live_arena(lengths, 22, seed=5)
    policy = make_policy("snapkv", allocation=allocation, observe="repeat", sinks=2)
    before = {
        (layer, head): [
            (float(scores[layer, head, slot]), int(arena.pos[layer, 0, head, slot]))
            for slot in range(int(lengths[layer, head]))
        ]
        for layer in range(LAYERS)
        for head in range(KV_HEADS)
    }
    EvictionStage(policy, Budget(0.5), LAYERS).reselect(arena, 0, scores, 10, seen=10_000)
    for (layer, head), entries in before.items():
        sinks = {p for _, p in entries if p < 2}
        rest = sorted((e for e in entries if e[1] >= 2), key=lambda e: (-e[0], e[1]))
        want = sinks | {p for _, p in rest[: max(min(10, len(entries)) - len(sinks), 0)]}
        count = int(arena.lengths[layer, 0, head])
        assert set(arena.pos[layer, 0, head, :count].tolist()) == want
