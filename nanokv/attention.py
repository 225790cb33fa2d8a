"""Causal attention of a prefill chunk against one layer's prompt K/V (torch SDPA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: (t, H_q, D) queries of a chunk; k, v: (n, H_kv, D) every key the chunk may see.

    Returns (t, H_q * D). The mask is causal by position, and Mistral's sliding window keeps a key
    at position p for a query at position i iff i - p < sliding_window.
    """
    allowed = key_positions.unsqueeze(0) <= query_positions.unsqueeze(1)  # (t, n)
    if sliding_window is not None:
        allowed &= key_positions.unsqueeze(0) > query_positions.unsqueeze(1) - sliding_window
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=allowed,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # (1, H_q, t, D)
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def arena_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    first_slot: torch.Tensor,
    *,
    scale: float,
    slot_pos: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of m new tokens per sequence against one layer of the arena, where they have
    already been written at slots ``first_slot + j``: token j sees every slot before its own and
    itself (and, with a sliding window, only positions within it).

    q: (B, m, H_q, D); k, v: (B, H_kv, C, D); first_slot: (B, H_kv); slot_pos: (B, H_kv, C);
    query_positions: (B, m). Returns (B, m, H_q * D).
    """
    batch, m, q_heads, _ = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    last_visible = first_slot.unsqueeze(-1) + torch.arange(m, device=q.device)  # (B, H_kv, m)
    slots = torch.arange(capacity, device=q.device)
    allowed = slots.view(1, 1, 1, -1) <= last_visible.unsqueeze(-1)  # (B, H_kv, m, C)
    if sliding_window is not None:
        oldest = query_positions.view(batch, 1, m, 1) - sliding_window
        allowed &= slot_pos.unsqueeze(2) > oldest
    allowed = allowed.repeat_interleave(q_heads // kv_heads, dim=1)  # (B, H_q, m, C)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=allowed, scale=scale, enable_gqa=q_heads != kv_heads
    )  # (B, H_q, m, D)
    return out.transpose(1, 2).reshape(batch, m, -1)
