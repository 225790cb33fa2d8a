"""KVArena invariants: no token lost or duplicated, capacity never exceeded, lengths exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanokv.arena import ArenaFullError, KVArena

LAYERS, KV_HEADS, Q_HEADS, DIM = 2, 2, 4, 3


def _arena(batch: int, capacity: int) -> KVArena:
    return KVArena(LAYERS, batch, KV_HEADS, capacity, DIM, dtype=torch.float32, q_heads=Q_HEADS)


def _prompt(n: int):
    """K/V whose every entry encodes its token position, so moves are checkable."""
    positions = torch.arange(n)
    k = positions.float().view(1, n, 1).expand(KV_HEADS, n, DIM).clone()
    return k, -k, positions


def _assert_consistent(arena: KVArena) -> None:
    """Every valid slot's K/V still encodes its position; empty slots are marked -1."""
    for layer in range(LAYERS):
        view = arena.layer(layer)
        for b in range(view.k.shape[0]):
            for g in range(KV_HEADS):
                length = int(view.lengths[b, g])
                assert length <= arena.capacity
                pos = view.pos[b, g, :length]
                assert (pos >= 0).all() and len(set(pos.tolist())) == length
                assert torch.equal(view.k[b, g, :length, 0], pos.float())
                assert torch.equal(view.v[b, g, :length, 0], -pos.float())
                assert (view.pos[b, g, length:] == -1).all()


@given(n=st.integers(1, 40), extra=st.integers(0, 10), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_fill_then_append_keeps_every_token(n, extra, seed):
    generator = torch.Generator().manual_seed(seed)
    keep = int(torch.randint(1, n + 1, (1,), generator=generator))
    kept = torch.stack([torch.randperm(n, generator=generator)[:keep].sort().values] * KV_HEADS)
    arena = _arena(batch=2, capacity=n + extra)
    k, v, positions = _prompt(n)
    for layer in range(LAYERS):
        arena.fill(layer, 0, k, v, positions)
        arena.fill(layer, 1, k, v, positions, kept=kept)
    for step in range(extra):
        for layer in range(LAYERS):
            token_pos = torch.tensor([n + step, n + step])
            new_k = token_pos.float().view(2, 1, 1).expand(2, KV_HEADS, DIM)
            arena.append(layer, new_k, -new_k, token_pos)
    _assert_consistent(arena)
    assert (arena.lengths[:, 0] == n + extra).all()
    assert (arena.lengths[:, 1] == keep + extra).all()
    expected = kept[0].tolist() + list(range(n, n + extra))
    assert arena.pos[0, 1, 0, : keep + extra].tolist() == expected


def test_append_beyond_capacity_is_refused():
    arena = _arena(batch=1, capacity=3)
    k, v, positions = _prompt(3)
    arena.fill(0, 0, k, v, positions)
    with pytest.raises(ArenaFullError):
        arena.append(0, torch.zeros(1, KV_HEADS, DIM), torch.zeros(1, KV_HEADS, DIM), positions[:1])


def test_append_is_refused_when_any_head_is_full():
    """The fullness check follows the longest head of a layer (kept on the host), through
    fill, compaction and appends: one full head refuses the write for all."""
    arena = _arena(batch=1, capacity=4)
    k, v, positions = _prompt(4)
    arena.fill(0, 0, k, v, positions)
    counts = torch.tensor([1] * (KV_HEADS - 1) + [3])  # the last head is the longest
    kept = torch.arange(3).expand(KV_HEADS, 3)
    arena.compact_sequence(0, 0, kept, counts)
    token = torch.zeros(1, KV_HEADS, DIM)
    arena.append(0, token, token, torch.tensor([4]))  # the last head: 4 of 4 slots
    with pytest.raises(ArenaFullError):
        arena.append(0, token, token, torch.tensor([5]))
    assert arena.lengths[0, 0].tolist() == [2] * (KV_HEADS - 1) + [4]


@given(
    n=st.integers(2, 30),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_compact_keeps_exactly_the_chosen_slots(n, data):
    """Per-head kept sets of different sizes; heads end with exactly their kept tokens."""
    arena = _arena(batch=1, capacity=n)
    k, v, positions = _prompt(n)
    arena.fill(0, 0, k, v, positions)
    counts = [data.draw(st.integers(1, n)) for _ in range(KV_HEADS)]
    width = max(counts)
    kept_slots = torch.zeros(1, KV_HEADS, width, dtype=torch.long)
    chosen = []
    for g, count in enumerate(counts):
        slots = sorted(data.draw(st.permutations(range(n)))[:count])
        chosen.append(slots)
        kept_slots[0, g, :count] = torch.tensor(slots)
    arena.compact(0, kept_slots, torch.tensor([counts]))
    _assert_consistent(arena)
    for g in range(KV_HEADS):
        assert arena.lengths[0, 0, g] == counts[g]
        assert arena.pos[0, 0, g, : counts[g]].tolist() == chosen[g]


def test_scatter_moves_window_into_freed_slots_with_value_norms():
    arena = _arena(batch=1, capacity=8)
    k, v, positions = _prompt(8)
    norms = positions.float().expand(Q_HEADS, 8) * 10
    arena.fill(0, 0, k, v, positions, value_norms=norms)
    victims = torch.tensor([[[1, 3], [0, 2]]])  # (B, H_kv, w)
    window = torch.tensor([[[6, 7], [6, 7]]])
    arena.scatter(0, window, victims)
    arena.set_lengths(0, torch.tensor([[6, 6]]))
    _assert_consistent(arena)
    assert arena.pos[0, 0, 0, :6].tolist() == [0, 6, 2, 7, 4, 5]
    assert arena.pos[0, 0, 1, :6].tolist() == [6, 1, 7, 3, 4, 5]
    # value norms follow their token: query heads 0-1 belong to kv head 0, 2-3 to kv head 1
    assert arena.value_norms[0, 0, 0, :6].tolist() == [0, 60, 20, 70, 40, 50]
    assert arena.value_norms[0, 0, 3, :6].tolist() == [60, 10, 70, 30, 40, 50]


def test_nbytes_counts_every_buffer():
    arena = _arena(batch=2, capacity=5)
    kv = 2 * LAYERS * 2 * KV_HEADS * 5 * DIM * 4
    slot_meta = 2 * LAYERS * 2 * KV_HEADS * 5 * 4 + LAYERS * 2 * Q_HEADS * 5 * 4
    assert arena.nbytes == kv + slot_meta + LAYERS * 2 * KV_HEADS * 4


def test_shrink_keeps_the_held_slots():
    arena = _arena(batch=1, capacity=10)
    k, v, positions = _prompt(6)
    arena.fill(0, 0, k, v, positions, value_norms=positions.float().expand(Q_HEADS, 6))
    arena.shrink(6)
    assert arena.capacity == 6 and arena.score.shape[-1] == 6 and arena.value_norms.shape[-1] == 6
    _assert_consistent(arena)
    arena.shrink(3)  # below what is held: refused silently, nothing lost
    assert arena.capacity == 6


def test_layer_views_follow_the_buffers_through_shrink_grow_and_copies():
    """`layer` views are made once, but always of the arena's current buffers: after a shrink,
    a grow, and in a deep copy (a cloned decode state), never of the old ones."""
    import copy

    arena = _arena(batch=1, capacity=8)
    k, v, positions = _prompt(4)
    arena.fill(0, 0, k, v, positions)
    assert arena.layer(0) is arena.layer(0)  # made once
    for change in (lambda a: a.shrink(6), lambda a: a.grow(10)):
        change(arena)
        view = arena.layer(0)
        assert view.k.data_ptr() == arena.k.data_ptr() and view.k.shape[1:] == arena.k.shape[2:]
        assert view.value_norms.shape[-1] == arena.capacity
    twin = copy.deepcopy(arena)
    twin.append(
        0, torch.full((1, KV_HEADS, DIM), 9.0), torch.zeros(1, KV_HEADS, DIM), positions[:1]
    )
    assert twin.layer(0).k.data_ptr() == twin.k.data_ptr()
    assert int(twin.layer(0).lengths[0, 0]) == 5 and int(arena.layer(0).lengths[0, 0]) == 4
    assert (arena.k[0, 0, :, 4] == 0).all()  # the original never saw the copy's write


@given(
    lengths=st.lists(st.integers(1, 12), min_size=LAYERS, max_size=LAYERS),
    extra=st.integers(0, 4),
    data=st.data(),
)
@settings(max_examples=40, deadline=None)
def test_per_layer_capacities_keep_every_token_and_bound_each_layer(lengths, extra, data):
    """`shrink_layers` gives each layer its own capacity: every held token survives, appends
    and compactions still work per layer, nothing writes past a layer's capacity, and the bytes
    are those of the per-layer sizes; `grow` stacks the layers again."""
    arena = _arena(batch=1, capacity=16)
    for layer, n in enumerate(lengths):
        k, v, positions = _prompt(n)
        arena.fill(layer, 0, k, v, positions, value_norms=positions.float().expand(Q_HEADS, n))
    capacities = [n + extra for n in lengths]
    arena.shrink_layers(capacities)
    assert [arena.layer_capacity(layer) for layer in range(LAYERS)] == capacities
    assert arena.per_layer == (len(set(capacities)) > 1)
    per_slot = 2 * DIM * 4 + 4 + 4  # K, V, pos, score
    norms = Q_HEADS * 4
    assert arena.nbytes == sum(c * (KV_HEADS * per_slot + norms) for c in capacities) + (
        LAYERS * KV_HEADS * 4
    )
    _assert_consistent(arena)
    for layer, n in enumerate(lengths):
        for step in range(extra):
            key = torch.full((1, KV_HEADS, DIM), float(n + step))
            arena.append(layer, key, -key, torch.tensor([n + step]))
        with pytest.raises(ArenaFullError):
            key = torch.zeros(1, KV_HEADS, DIM)
            arena.append(layer, key, key, torch.tensor([99]))
        held = n + extra
        keep = sorted(data.draw(st.sets(st.integers(0, held - 1), min_size=1, max_size=held)))
        kept_slots = torch.tensor([keep] * KV_HEADS)
        arena.compact_sequence(layer, 0, kept_slots, torch.tensor([len(keep)] * KV_HEADS))
        assert arena.pos[layer][0, 0, : len(keep)].tolist() == keep
    _assert_consistent(arena)
    arena.grow(max(capacities) + 2)
    assert not arena.per_layer and arena.capacity == max(capacities) + 2
    _assert_consistent(arena)
