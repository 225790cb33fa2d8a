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
