"""`arena_probe_attention`: KVzip's probe rows against a live arena, in tiles, against a dense
reference (explicit masks and softmaxes over the arena's slots and the segment's own keys)."""

from __future__ import annotations

import pytest
import torch

from nanokv.probe import ProbeSegment
from nanokv.recompress import arena_probe_attention


def dense_arena_probe(q, k, v, slot_pos, lengths, own_k, own_v, own_pos, segment, sinks, scale,
                      window):  # fmt: skip
    """(c, H_q * D) output and (H_q, C) scores, one query head and one row at a time."""
    c, q_heads, head_dim = q.shape
    kv_heads, capacity, _ = k.shape
    group = q_heads // kv_heads
    out = torch.zeros(c, q_heads, head_dim)
    scores = torch.zeros(q_heads, capacity)
    for head in range(q_heads):
        g = head // group
        keys = torch.cat([k[g], own_k[:, g]])  # (C + r, D)
        values = torch.cat([v[g], own_v[:, g]])
        key_pos = torch.cat([slot_pos[g].long(), own_pos])
        is_slot = torch.arange(len(keys)) < capacity
        valid = ~is_slot | (torch.arange(len(keys)) < lengths[g])
        in_span = (key_pos >= segment.start) & (key_pos < segment.end)
        sink = (key_pos >= 0) & (key_pos < min(sinks, segment.start))
        scored = ~is_slot | in_span | sink
        for row in range(c):
            query = own_pos[-c:][row]
            visible = valid & (key_pos <= query)
            if window is not None:
                visible &= query - key_pos < window
            logits = keys @ q[row, head] * scale
            probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=0)
            out[row, head] = probs @ values
            kept = visible & scored
            in_score = torch.softmax(logits.masked_fill(~kept, float("-inf")), dim=0)
            scores[head] = torch.maximum(scores[head], in_score[:capacity])
    return out.reshape(c, -1), scores


def _case(seed: int, capacity: int = 12, r: int = 7, kv_heads: int = 2, group: int = 3):
    """A ragged arena (heads hold 12 and 9 slots) of positions 0..29 with gaps, probed by the
    last 4 of r segment rows at positions 30.."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = 8
    k, v = (torch.randn(kv_heads, capacity, head_dim, generator=gen) * 2 for _ in range(2))
    own_k, own_v = (torch.randn(r, kv_heads, head_dim, generator=gen) * 2 for _ in range(2))
    q = torch.randn(4, kv_heads * group, head_dim, generator=gen) * 2
    kept = torch.tensor([0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 25, 29])
    slot_pos = torch.stack([kept, kept.roll(1)]).int()  # the second head unsorted
    lengths = torch.tensor([capacity, 9])
    own_pos = torch.arange(30, 30 + r)
    return q, k, v, slot_pos, lengths, own_k, own_v, own_pos


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("tile_rows", [1, 3, None])
@pytest.mark.parametrize("span", [(4, 20), (10, 30)])
def test_tiles_equal_the_dense_reference(window, tile_rows, span):
    """Output and scores of every tiling (1 row, 3 rows, all) equal the dense computation:
    empty slots, slots outside the span (unscored but attended), sinks, Mistral's window."""
    q, k, v, slot_pos, lengths, own_k, own_v, own_pos = _case(0)
    segment = ProbeSegment([0] * len(own_pos), *span)
    tile = None if tile_rows is None else tile_rows * 3 * (k.shape[1] + len(own_pos))
    got_out, got_scores = arena_probe_attention(
        q, k, v, slot_pos, lengths, own_k, own_v, own_pos, segment, sinks=4, scale=0.3,
        sliding_window=window, tile_elements=tile,
    )  # fmt: skip
    want_out, want_scores = dense_arena_probe(
        q, k, v, slot_pos, lengths, own_k, own_v, own_pos, segment, 4, 0.3, window
    )
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_scores, want_scores, atol=1e-6, rtol=1e-5)
    assert (got_scores > 0).any() and (got_scores[3:, 9:] == 0).all()  # empty slots score 0


def test_scores_exactly_when_the_scored_keys_are_far_below_the_row_max():
    """An unscored slot (outside the span) with a huge logit: every scored key's exp(x - row
    max) underflows, so the tile scores from the scored keys' own softmax."""
    q, k, v, slot_pos, lengths, own_k, own_v, own_pos = _case(1)
    q[:] = 1.0
    k[:, 8] = 60.0  # slot 8 (position 18 / 15) lies outside the span [0, 10): not scored
    segment = ProbeSegment([0] * len(own_pos), 0, 10)
    got_out, got_scores = arena_probe_attention(
        q, k, v, slot_pos, lengths, own_k, own_v, own_pos, segment, sinks=4, scale=1.0
    )
    want_out, want_scores = dense_arena_probe(
        q, k, v, slot_pos, lengths, own_k, own_v, own_pos, segment, 4, 1.0, None
    )
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    assert want_scores.amax() > 0.01  # the scored keys matter among themselves
    torch.testing.assert_close(got_scores, want_scores, atol=0, rtol=1e-5)
