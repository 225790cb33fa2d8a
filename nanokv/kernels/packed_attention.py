"""Decode attention over a packed arena layer (`head_pages.py`), read where it lies.

The same contract as `decode_attention` without emission (DESIGN.md, "The decode-attention
contract"): one query token per sequence attends to the valid slots ``0 .. lengths[b, g] - 1`` of
its kv head's row, inside the sliding window if any (a slot past its row's length holds position
-1). A packed layer keeps every (sequence, kv head) row in its own run of one flat buffer, so
each query head attends over the whole flat buffer with only its own row's valid slots
admitted, no gather of the rows into a rectangle. In fp32 the logits are one addmm onto an
additive bias that is -inf off each head's row, made once for a layout (`HeadPages.row_bias`:
the rows move only at an eviction), and the empty slots are filled with -inf (with many
sequences, where such a bias would be as large as the logits, a boolean mask is built instead);
half precision goes through one fused SDPA call under that mask on CUDA, and on a CPU takes
the fp32 path on the layer's K/V converted, with the held bias (`converts_half`): without bf16
instructions every half-precision operand is converted anyway, and laprox with a bf16 cache
under fp32 weights went from 0.93x to 0.97x the fp32 cache's decode step (`bench/e2e.py
--kv-dtypes`, docs/bench/e2e_kv_bf16.jsonl); with them (a Zen 5 EPYC, AVX512-BF16) the
converted path still took 86 against 127 us for a layer of 1,300 slots and 9 query heads
(`/tmp` microbenchmark of the two paths). Every query head pays
the flops of every row (H_kv x B times the rectangle's), which is small where packing applies:
a compressed cache of a few percent of the prompt. Policies that emit statistics get
them at the next eviction, from a gathered rectangle (`Engine.settle`), as on a rectangular layer.
Runs as torch ops on every device; on a CPU the C kernel of `cpu_attention.py` answers first
where it applies (fp32 and bf16, head sizes a multiple of 16): it reads each query head's own
row only, so none of the above flops over the other rows (laprox at 5% of 8128 tokens, bf16,
one thread: 22.4 -> 20.1 ms a step with it, `/tmp` A/B of `NANOKV_NATIVE=0` and 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanokv.head_pages import HeadPages
from nanokv.kernels.cpu_attention import applies, cpu_packed_decode_attention


def packed_slot_mask(
    pages: HeadPages,
    slot_pos: torch.Tensor,
    group: int,
    query_pos: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Bool (B * H_q, S): query head (b, h) attends flat slot s (its row's, holding a token,
    inside the sliding window), `group` query heads a kv head. slot_pos (S,) int: -1 marks an
    empty slot, which every slot at or past its row's length is (`KVArena.set_lengths`);
    query_pos (B,)."""
    mask = pages.own_rows(group) & (slot_pos != -1)  # (B * H_q, S)
    if sliding_window is not None:
        mask &= _inside_window(slot_pos, query_pos, sliding_window, mask.shape[0])
    return mask


def _inside_window(
    slot_pos: torch.Tensor, query_pos: torch.Tensor | None, sliding_window: int, rows: int
) -> torch.Tensor:
    """Bool (rows, S), rows = B * H_q query heads: the slot's token is inside the sliding
    window of the query head's sequence (query_pos (B,))."""
    if query_pos is None:
        raise ValueError("a sliding window needs query_pos")
    query_heads = rows // query_pos.shape[0]
    oldest = (query_pos.repeat_interleave(query_heads) - sliding_window).unsqueeze(1)
    return slot_pos.unsqueeze(0) > oldest


def converts_half(device_type: str) -> bool:
    """Whether a half-precision packed layer attends in fp32 on its K/V converted (see the module
    docstring): on every CPU, with or without bf16 instructions; SDPA under a mask on CUDA."""
    return device_type == "cpu"


def packed_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_pos: torch.Tensor,
    pages: HeadPages,
    *,
    scale: float,
    query_pos: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q (B, H_q, D); k, v (S, D) and slot_pos (S,) int a packed layer's flat buffers;
    query_pos (B,). Returns (B, H_q, D) in q's dtype. fp32 is computed as
    `decode_attention_reference` does (logits, masked softmax, weighted sum; the scale and the
    rows' mask folded into one addmm); half precision through SDPA (fp32 softmax, the cache's
    dtype for the products)."""
    batch, q_heads, head_dim = q.shape
    group = q_heads // pages.caps.shape[1]
    if k.device.type == "cpu":
        out = _native(q, k, v, slot_pos, pages, scale, query_pos, sliding_window)
        if out is not None:
            return out
    if k.dtype != torch.float32 and converts_half(k.device.type):
        k, v = k.float(), v.float()  # a compressed layer's few slots: cheap to convert
    rows = q.reshape(batch * q_heads, head_dim)
    rows = rows.float() if k.dtype == torch.float32 else rows  # a no-op for an fp32 model
    bias = pages.row_bias(group, k.dtype) if k.dtype == torch.float32 else None
    if bias is not None:  # (B * H_q, S): -inf off each head's row
        logits = torch.addmm(bias, rows, k.transpose(0, 1), alpha=scale)
        logits.masked_fill_(slot_pos == -1, float("-inf"))  # empty slots, every head
        if sliding_window is not None:
            inside = _inside_window(slot_pos, query_pos, sliding_window, logits.shape[0])
            logits.masked_fill_(~inside, float("-inf"))
        out = torch.softmax(logits, dim=-1) @ v
    elif k.dtype == torch.float32:
        mask = packed_slot_mask(pages, slot_pos, group, query_pos, sliding_window)
        logits = (rows @ k.transpose(0, 1)) * scale  # (B * H_q, S)
        out = torch.softmax(logits.masked_fill_(~mask, float("-inf")), dim=-1) @ v
    else:
        mask = packed_slot_mask(pages, slot_pos, group, query_pos, sliding_window)
        q_kv = rows if rows.dtype == k.dtype else rows.to(k.dtype)
        out = F.scaled_dot_product_attention(
            q_kv.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask.unsqueeze(0),
            scale=scale,
        )[0]  # fmt: skip
    out = out.view(batch, q_heads, head_dim)
    return out if out.dtype == q.dtype else out.to(q.dtype)


def _native(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_pos: torch.Tensor,
    pages: HeadPages,
    scale: float,
    query_pos: torch.Tensor | None,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """The C kernel's answer (`cpu_attention.py`: each query head reads its own row only), or
    None where it does not apply."""
    q_kv = q if q.dtype == k.dtype else q.to(k.dtype)
    if not applies(q_kv, k, v, pages.caps.shape[1]):
        return None
    attended = slot_pos != -1  # (S,)
    if sliding_window is not None:
        if query_pos is None:
            raise ValueError("a sliding window needs query_pos")
        sequence = pages.row_of_slot.long() // pages.caps.shape[1]  # (S,)
        attended &= slot_pos > query_pos[sequence] - sliding_window
    out = cpu_packed_decode_attention(q_kv, k, v, pages.starts, pages.caps, attended, scale)
    if out is None:
        return None
    return out if out.dtype == q.dtype else out.to(q.dtype)
