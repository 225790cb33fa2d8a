"""Value-output norms ``c[h, j] = ||v_j W_O^h||``, computed when token j is written to the arena.

The decode kernel emits ``sum_h a[h, j] * c[h, j]`` (the output contribution of slot j), and LaProx
scores prefill tokens with the same norms. Projecting every value through ``W_O^h`` (D x hidden)
would cost ``D * hidden`` per head and token; instead ``||v W_O^h||^2 = v G_h v^T`` with the
(D x D) Gram matrix ``G_h = W_O^h (W_O^h)^T`` precomputed once at load, which costs ``D * D``.

Plain torch: one small batched matmul per written token, no Triton kernel needed.
"""

from __future__ import annotations

import torch


def output_gram(o_proj_weight: torch.Tensor, q_heads: int, head_dim: int) -> torch.Tensor:
    """Per-head Gram matrices of the output projection, float32 (H_q, D, D).

    ``o_proj_weight`` is a Hugging Face ``Linear`` weight (hidden, H_q * D) (``out = x @ W^T``), so
    ``W_O^h = o_proj_weight[:, h*D:(h+1)*D].T`` (D x hidden) and ``G_h = W_O^h (W_O^h)^T``.
    """
    hidden, width = o_proj_weight.shape
    if width != q_heads * head_dim:
        raise ValueError(f"o_proj weight has {width} inputs, expected {q_heads} x {head_dim}")
    w_o = o_proj_weight.float().view(hidden, q_heads, head_dim).permute(1, 2, 0)  # (H_q, D, hid)
    return w_o @ w_o.transpose(1, 2)  # (H_q, D, D)


def value_output_norms(v: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``||v_j W_O^h||`` for every query head h and token j, float32 (..., H_q, T).

    v: (..., H_kv, T, D) values of the tokens being written; gram: (H_q, D, D) from ``output_gram``.
    Query head h reads the values of kv head ``h // (H_q // H_kv)``. The quadratic form is
    clamped at 0 before the square root: it is a squared norm, but fp32 rounding of a tiny one
    can land just below zero.
    """
    kv_heads, _, head_dim = v.shape[-3:]
    q_heads = gram.shape[0]
    if q_heads % kv_heads or gram.shape[1:] != (head_dim, head_dim):
        raise ValueError(f"gram {tuple(gram.shape)} does not fit values {tuple(v.shape)}")
    group = q_heads // kv_heads
    lead, tokens = v.shape[:-3], v.shape[-2]
    # Batch dims and tokens become the rows of one matmul per kv head: the Gram matrices are read
    # once, never broadcast over the batch.
    vf = v.float().movedim(-3, 0).reshape(kv_heads, 1, -1, head_dim)  # (H_kv, 1, M, D)
    projected = vf @ gram.view(kv_heads, group, head_dim, head_dim)  # (H_kv, G, M, D)
    squared = (projected * vf).sum(-1)  # (H_kv, G, M)
    norms = squared.clamp_min(0).sqrt().reshape(q_heads, *lead, tokens)
    return norms.movedim(0, -2)  # (..., H_q, T)
