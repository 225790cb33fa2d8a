"""Recompressing a live arena: KVzip's probe scored against the arena's kept slots, and the
selection that brings every (layer, kv head) back to a budget.

A conversation (nanokv/conversation.py) holds its turns in one arena and, after each answer,
compresses it again without re-prefilling anything: nothing of the evicted tokens is left to
run a document pass over. The probe of nanokv/probe.py (the instruction, then the conversation's
tokens that some head still holds, teacher-forced) therefore runs *against the arena*: its rows
attend to each head's kept slots and, causally, to the segment's own keys, exactly as the next
tokens of the conversation would; their hidden states go on to the next layer. The score of a
slot follows `ProbeScores`: per query head, the max over the segment's rows of the softmax
probability of the slot (the policy then reduces the GQA group, weighting by value norms if it
is output-aware, as at prefill), the softmax running over the slots that hold a sink (position
< sinks), the slots whose position lies in the segment's span, and the segment's own keys up to
the row. Slots outside every span score 0 (the selection protects the sinks). The
probe's K/V live in per-layer temporaries and never reach the arena.

These functions compute; the engine runs the model and the arena moves the data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from nanokv.kernels.prefill_scores import SCORE_GAP
from nanokv.policies.selection import keep_order, protection_rank
from nanokv.probe import ProbeSegment


def arena_probe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_pos: torch.Tensor,
    lengths: torch.Tensor,
    own_k: torch.Tensor,
    own_v: torch.Tensor,
    own_pos: torch.Tensor,
    segment: ProbeSegment,
    *,
    sinks: int,
    scale: float,
    sliding_window: int | None = None,
    tile_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of probe rows against one layer of one sequence's arena.

    q: (c, H_q, D) the rows, the last c of the segment seen so far; k, v: (H_kv, C, D) the
    arena's slots; slot_pos: (H_kv, C); lengths: (H_kv,) valid slots of each head; own_k, own_v:
    (r, H_kv, D) the segment's keys up to the rows' own; own_pos: (r,). Returns the rows'
    attention output (c, H_q * D) in q's dtype (over every valid slot and the segment's keys,
    causal: what the model computes) and (H_q, C) float32 scores of the slots per query head,
    max over the rows (the module's rule before the GQA reduction, which is the policy's; 0 for
    slots outside the span and the sinks, and for empty slots).

    As `kernels/prefill_scores.probe_attention` does for a document, the rows go through in
    tiles of one GQA group and a few rows (`tile_elements` logits, in cache on CPU), and the
    output and the score come from the same exponentials exp(x - the row's max): the output
    divides them by their sum over every visible key, the score by their sum over the scored
    ones (a tile where that sum could have underflowed scores from its own softmax)."""
    c, q_heads, head_dim = q.shape
    kv_heads, capacity, _ = k.shape
    group = q_heads // kv_heads
    if tile_elements is None:
        tile_elements = 1 << 19 if q.device.type == "cpu" else 1 << 26
    rows = max(1, tile_elements // (group * (capacity + own_k.shape[0])))
    query_pos = own_pos[-c:]
    seen_slots, scored_slots = _slot_masks(slot_pos, lengths, query_pos, segment, sinks)
    if sliding_window is not None:
        seen_slots &= _visible(query_pos.view(1, -1, 1), slot_pos.unsqueeze(1), sliding_window)
    seen_own = _visible(query_pos.view(-1, 1), own_pos.view(1, -1), sliding_window)  # (c, r)
    scaled = (q.float() * scale).view(c, kv_heads, group, head_dim)
    out = torch.empty(kv_heads, group, c, head_dim, dtype=torch.float32, device=q.device)
    best = torch.zeros(kv_heads, group, capacity, dtype=torch.float32, device=q.device)
    for g in range(kv_heads):
        keys_t = torch.cat([k[g], own_k[:, g]]).float().T  # (D, C + r)
        values = torch.cat([v[g], own_v[:, g]]).float()  # (C + r, D)
        scored = scored_slots[g, 0].float()  # (C,) 1 for a sink or a span slot
        for r0 in range(0, c, rows):
            r1 = min(r0 + rows, c)
            hidden = ~torch.cat([seen_slots[g, r0:r1], seen_own[r0:r1]], dim=-1)  # (b, C + r)
            rows_q = scaled[r0:r1, g].transpose(0, 1).reshape(-1, head_dim)  # (G * b, D)
            logits = functools.partial(_tile_logits, rows_q, keys_t, hidden)
            out[g, :, r0:r1], score = _probe_tile(logits, values, scored)
            torch.maximum(best[g], score, out=best[g])
    out = out.permute(2, 0, 1, 3).reshape(c, q_heads * head_dim).to(q.dtype)
    return out, best.reshape(q_heads, capacity)


def _tile_logits(rows_q: torch.Tensor, keys_t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """(G, b, C + r) logits of one group's scaled rows (G * b, D) against keys_t (D, C + r), -inf
    where `hidden` (b, C + r) says a row does not see a key."""
    logits = (rows_q @ keys_t).view(-1, hidden.shape[0], keys_t.shape[1])
    return logits.masked_fill_(hidden, -math.inf)


def _probe_tile(
    logits: Callable[[], torch.Tensor], values: torch.Tensor, scored: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile of `arena_probe_attention`: logits() its masked logits (G, b, C + r), values
    (C + r, D) float32, scored (C,) the slots in the score's softmax (the segment's own keys
    always are). Returns the output (G, b, D) and (G, C) the rows' max of each slot's
    probability in the softmax over the scored keys."""
    capacity = scored.shape[0]
    weights = logits()
    weights = weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()  # a row sees its own key
    out = (weights @ values).div_(weights.sum(dim=-1, keepdim=True))
    own_sum = weights[..., capacity:].sum(dim=-1, keepdim=True)
    slot_weights = weights[..., :capacity].mul_(scored)  # (G, b, C), 0 where not scored
    scored_sum = slot_weights.sum(dim=-1, keepdim=True) + own_sum
    if float(scored_sum.min()) < math.exp(-SCORE_GAP):  # rare: the scored keys' own softmax
        exact = logits()
        exact[..., :capacity].masked_fill_(scored == 0, -math.inf)
        return out, torch.softmax(exact, dim=-1)[..., :capacity].amax(dim=1)
    return out, slot_weights.div_(scored_sum).amax(dim=1)


def _slot_masks(
    slot_pos: torch.Tensor,
    lengths: torch.Tensor,
    query_pos: torch.Tensor,
    segment: ProbeSegment,
    sinks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (H_kv, c, C) slots each row sees (valid and not after it), and (H_kv, 1, C) slots in
    the score's softmax (a sink, or in the segment's span)."""
    capacity = slot_pos.shape[-1]
    valid = torch.arange(capacity, device=slot_pos.device) < lengths.view(-1, 1)  # (H_kv, C)
    pos = slot_pos.long()
    seen = valid.unsqueeze(1) & (pos.unsqueeze(1) <= query_pos.view(1, -1, 1))
    sink = min(sinks, segment.start)
    in_span = (pos >= segment.start) & (pos < segment.end)
    return seen, (((pos >= 0) & (pos < sink)) | in_span).unsqueeze(1)


def _visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool, broadcast: the query sees the key (causal by position, and Mistral's window)."""
    diff = query_pos - key_pos
    mask = diff >= 0
    return mask & (diff < window) if window is not None else mask


def kept_to_budget(
    scores: torch.Tensor,
    slot_pos: torch.Tensor,
    lengths: torch.Tensor,
    cache: int,
    *,
    sinks: int,
    window: int,
    seen: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots each kv head keeps: (H_kv, m) slot indices, ascending, valid up to (H_kv,)
    counts, for `KVArena.compact_sequence`.

    scores, slot_pos: (H_kv, C); lengths: (H_kv,). A head keeps min(cache, length) slots: the
    protected ones first (the sinks, then the last `window` of the `seen` positions, most recent
    first: selection.protection_rank), then the highest scores, ties by slot (= by position: a
    conversation's slots stay in position order)."""
    capacity = scores.shape[-1]
    slots = torch.arange(capacity, device=scores.device)
    valid = slots < lengths.view(-1, 1)
    rank = torch.where(valid, protection_rank(slot_pos, seen, sinks, window), -1)
    ranked = scores.float().masked_fill(~valid, float("-inf"))
    counts = lengths.long().clamp(max=cache)
    width = max(int(counts.max()), 1)
    chosen = keep_order(ranked, rank)[:, :width]  # (H_kv, m) in keep order
    padding = slots[:width] >= counts.view(-1, 1)
    kept = chosen.masked_fill(padding, capacity).sort(dim=-1).values  # padding sorts last
    return kept.clamp(max=capacity - 1), counts
