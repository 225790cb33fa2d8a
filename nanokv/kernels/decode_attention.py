"""Decode attention over one layer of the KV arena, with optional per-slot emission.

Contract (DESIGN.md, "The decode-attention contract"): one query token per sequence attends to the
valid slots ``0 .. lengths[b, g] - 1`` of its kv head ``g``; GQA groups share a kv head. When
``emit`` is set, the kernel also returns, per slot and summed over the query heads of the group,
the attention mass ``sum_h a[h, j]`` and the output contribution ``sum_h a[h, j] * c[h, j]`` where
``c[h, j] = ||v_j W_O^h||`` is stored in the arena when token ``j`` is written.

Three implementations of the same contract live here:

- ``decode_attention_reference``: dense torch in fp32, obviously right, what the others are
  tested against;
- ``decode_attention_torch``: what runs on CPU (and wherever Triton does not); on CPU it reads
  only the slots below the longest head's length (without a sliding window). It never copies
  the arena to fp32: the output comes from one fused call, on a CPU the C kernel of
  ``cpu_attention.py`` (fp32 and bf16 caches, fp32 inside, one rounding at the end) and
  torch's SDPA elsewhere and for what the C kernel does not take (fp32 logits and softmax, P.V
  in the cache's dtype with fp32 accumulation, as in the Triton kernel), and emission adds
  fp32 logits (over blocks of slots in half precision);
- ``decode_attention_triton``: split-K ("flash-decoding") Triton kernels, what runs on CUDA.
  Stage 1 reduces fixed-size splits of slots to a partial (max, sum-exp, output); stage 2 merges
  the splits and stores the log-sum-exp; the emission pass recomputes q.k for each slot block and
  turns it into probabilities with that stored log-sum-exp. Everything is in base 2 (logits are
  pre-multiplied by log2(e), ``exp2`` everywhere, the LSE is a log2) so the three stages agree.

The same Triton kernels read slots through a page table when one is given; Quest's sparse
attention (``kernels/quest.py``) is that mode.

Triton is imported guarded and the kernels are jitted on first launch, so this module imports where
Triton is missing and ``TRITON_INTERPRET=1`` set by a test module still takes effect.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanokv.kernels.cpu_attention import cpu_decode_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None
    tl = None

LOG2E = 1.4426950408889634
BLOCK_N = 32  # slots per inner block of the Triton kernels
SPLIT_SIZE = 256  # slots per split-K partition: fixed, so the same input gives the same result
LOGIT_BLOCK = 1024  # slots converted to fp32 at a time by the torch path's half-precision emission


@dataclass
class Emitted:
    """Per-slot side outputs of decode attention, summed over each GQA group."""

    mass: torch.Tensor  # (B, H_kv, C) float32, sum_h a[h, j]; 0 for invalid slots
    contribution: torch.Tensor | None  # (B, H_kv, C) float32, sum_h a[h, j] * c[h, j]


def valid_slot_mask(
    lengths: torch.Tensor,
    capacity: int,
    slot_pos: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Bool (B, H_kv, C): slot j is attended (j < length, and inside the sliding window if any).

    The sliding window follows Mistral: query at position i sees key at position p iff
    ``i - p < sliding_window``.
    """
    mask = _slot_numbers(capacity, lengths.device) < lengths.unsqueeze(-1)
    if sliding_window is not None:
        if slot_pos is None or query_pos is None:
            raise ValueError("a sliding window needs slot_pos and query_pos")
        oldest = query_pos.view(-1, 1, 1) - sliding_window
        mask &= slot_pos > oldest
    return mask


@functools.lru_cache(maxsize=64)  # arenas of a process have few capacities; bounded all the same
def _slot_numbers(capacity: int, device: torch.device) -> torch.Tensor:
    """(1, 1, C) int64 0 .. C - 1, made once per capacity and device and shared (read only): the
    mask of every decode step compares against it."""
    return torch.arange(capacity, device=device).view(1, 1, -1)


def masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    value_norms: torch.Tensor | None = None,
    emit: bool = False,
) -> tuple[torch.Tensor, Emitted | None]:
    """Dense torch attention of one query per (batch, query head) over the slots where ``mask``
    (every slot of k when ``mask`` is None).

    q: (B, H_q, D); k, v: (B, H_kv, C, D); mask: (B, H_kv, C) bool; value_norms: (B, H_q, C).
    Shared by the dense and the page-sparse references, which differ only in the mask.
    """
    batch, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    qg = q.float().view(batch, kv_heads, q_heads // kv_heads, head_dim)
    logits = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # (B, H_kv, G, C)
    if mask is not None:
        logits = logits.masked_fill_(~mask.unsqueeze(2), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, v.float()).reshape(batch, q_heads, head_dim)
    out = out if out.dtype == q.dtype else out.to(q.dtype)  # a no-op `to` still dispatches
    return out, (_emitted(probs, value_norms) if emit else None)


def _emitted(
    probs: torch.Tensor, value_norms: torch.Tensor | None, over: int | tuple[int, ...] = 2
) -> Emitted:
    """Per-slot mass and output contribution from float32 probabilities (B, H_kv, G, C), or
    (B, H_kv, n, G, C) over n steps, summed over the dims `over` (the group by default)."""
    contribution = None
    if value_norms is not None:
        batch, kv_heads, *_, group, capacity = probs.shape
        steps = [1] * (probs.dim() - 4)  # value norms are the same at every step
        norms = value_norms.float().reshape(batch, kv_heads, *steps, group, capacity)
        contribution = (probs * norms).sum(dim=over)
    return Emitted(mass=probs.sum(dim=over), contribution=contribution)


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    slot_pos: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    sliding_window: int | None = None,
    value_norms: torch.Tensor | None = None,
    emit: bool = False,
) -> tuple[torch.Tensor, Emitted | None]:
    """Dense torch decode attention of the contract above.

    q: (B, H_q, D); k, v: (B, H_kv, C, D); lengths: (B, H_kv) int; slot_pos: (B, H_kv, C) int;
    query_pos: (B,) int; value_norms: (B, H_q, C) float32. Returns out (B, H_q, D) in q's dtype.
    Every (b, kv head) must have at least one attended slot. Shapes are checked
    (`check_layout`).
    """
    check_layout(q, k, v, lengths, slot_pos, query_pos, value_norms)
    mask = valid_slot_mask(lengths, k.shape[2], slot_pos, query_pos, sliding_window)
    return masked_attention_reference(
        q, k, v, mask, scale=scale, value_norms=value_norms, emit=emit
    )


def decode_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    slot_pos: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    sliding_window: int | None = None,
    value_norms: torch.Tensor | None = None,
    emit: bool = False,
) -> tuple[torch.Tensor, Emitted | None]:
    """The contract in torch ops that read the arena in its own dtype (see the module docstring).

    Same arguments and outputs as ``decode_attention_reference``. Without emission or a sliding
    window, on a CPU where the C kernel applies, each head attends its own length in one call
    (no mask, nothing past a head's length read). Otherwise, without a sliding window,
    and with lengths in host memory (the decode loop never waits for a GPU), it reads only the
    slots below the longest head's length, with no mask when every head has that length (a
    full cache: the mask's ops are a fixed cost a layer on top of a few hundred slots'
    attention), and emits zeros past it; the output is then the same bits with and without
    emission.
    """
    check_layout(q, k, v, lengths, slot_pos, query_pos, value_norms)
    if not emit and sliding_window is None and lengths.dtype == torch.int32 and not q.is_cuda:
        out = cpu_decode_attention(_as_kv(q, k), k, v, None, scale, lengths=lengths)
        if out is not None:  # each head over its own length, in one call
            return out if out.dtype == q.dtype else out.to(q.dtype), None
    if sliding_window is not None or lengths.device.type != "cpu":  # reading it would wait
        mask = valid_slot_mask(lengths, k.shape[2], slot_pos, query_pos, sliding_window)
        return masked_attention_torch(
            q, k, v, mask, scale=scale, value_norms=value_norms, emit=emit
        )
    capacity = k.shape[2]
    shortest, longest = (int(n) for n in lengths.aminmax())
    k, v = k.narrow(2, 0, longest), v.narrow(2, 0, longest)  # (B, H_kv, longest, D) views
    norms = None if value_norms is None else value_norms.narrow(2, 0, longest)
    mask = None if shortest == longest else valid_slot_mask(lengths, longest)
    out, emitted = masked_attention_torch(q, k, v, mask, scale=scale, value_norms=norms, emit=emit)
    return out, None if emitted is None else _padded(emitted, capacity)


def _padded(emitted: Emitted, capacity: int) -> Emitted:
    """`emitted` over the first slots of a layer, with zeros up to `capacity` slots."""
    pad = (0, capacity - emitted.mass.shape[-1])
    contribution = emitted.contribution
    return Emitted(
        mass=F.pad(emitted.mass, pad),
        contribution=None if contribution is None else F.pad(contribution, pad),
    )


def masked_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    value_norms: torch.Tensor | None = None,
    emit: bool = False,
) -> tuple[torch.Tensor, Emitted | None]:
    """``masked_attention_reference`` without fp32 copies of k and v (same shapes): the output
    comes from one fused call (the C kernel of `cpu_attention.py` on a CPU where it applies,
    else SDPA; the reference makes four, in fp32 too) whether or not statistics are emitted, so
    a policy that keeps every token decodes exactly as the full cache does, and emission adds
    fp32 logits over blocks of slots, as the Triton kernel's emission pass recomputes q.k.
    Shared by the dense and the page-gathered (Quest) torch paths."""
    batch, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    qg = q.view(batch, kv_heads, q_heads // kv_heads, head_dim)  # a group's heads: G queries
    q_kv = _as_kv(q, k)
    out = cpu_decode_attention(q_kv, k, v, mask, scale) if q.device.type == "cpu" else None
    if out is None:
        sdpa_mask = None if mask is None else mask.unsqueeze(2)  # (B, H_kv, 1, C)
        out = F.scaled_dot_product_attention(
            q_kv.view(qg.shape), k, v, attn_mask=sdpa_mask, scale=scale
        ).reshape(batch, q_heads, head_dim)
    out = out if out.dtype == q.dtype else out.to(q.dtype)
    if not emit:
        return out, None
    logits = _blocked_logits(qg, k, scale)
    if mask is not None:
        logits = logits.masked_fill_(~mask.unsqueeze(2), float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, H_kv, G, C) float32
    return out, _emitted(probs, value_norms)


def _as_kv(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q in the cache's dtype (a no-op `to` still dispatches, so none is called then)."""
    return q if q.dtype == k.dtype else q.to(k.dtype)


def emitted_over_steps(
    q: torch.Tensor,
    k: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    slot_pos: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    sliding_window: int | None = None,
    value_norms: torch.Tensor | None = None,
    summed: bool = True,
) -> Emitted:
    """What ``decode_attention(..., emit=True)`` emits at each of n decode steps of one arena
    layer, from one batched pass, summed over the steps (what a policy that only adds them up
    needs) or per step (`summed=False`). The engine defers them to its next eviction (see
    `Engine.settle`); exact when only appends happened between the steps, so that every slot
    step t saw is unchanged.

    q: (B, n, H_q, D) step t's queries; k: (B, H_kv, C, D); lengths: (B, n, H_kv) the valid
    slots at step t; query_pos: (B, n); slot_pos (B, H_kv, C) and value_norms (B, H_q, C) as
    in the contract. Mass and contribution are float32 (B, H_kv, C), or (B, H_kv, n, C) per
    step."""
    batch, steps, q_heads, head_dim = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    qg = q.view(batch, steps, kv_heads, group, head_dim).transpose(1, 2)  # (B, H_kv, n, G, D)
    logits = _blocked_logits(qg.reshape(batch, kv_heads, steps * group, head_dim), k, scale)
    if sliding_window is None:  # the positions matter only to a window
        slot_pos = None
    if slot_pos is not None:  # one row of slot positions for each (sequence, step)
        slot_pos = slot_pos.unsqueeze(1).expand(-1, steps, -1, -1).reshape(-1, kv_heads, capacity)
    flat_query_pos = None if query_pos is None else query_pos.reshape(-1)
    seen = (
        valid_slot_mask(
            lengths.reshape(-1, kv_heads), capacity, slot_pos, flat_query_pos, sliding_window
        )
        .view(batch, steps, kv_heads, capacity)
        .transpose(1, 2)
    )  # (B, H_kv, n, C)
    logits = logits.view(batch, kv_heads, steps, group, capacity)
    probs = torch.softmax(logits.masked_fill_(~seen.unsqueeze(3), float("-inf")), dim=-1)
    return _emitted(probs, value_norms, over=(2, 3) if summed else 3)  # steps and group


def _blocked_logits(qg: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 logits (B, H_kv, G, C) of queries qg (B, H_kv, G, D) against k (B, H_kv, C, D) of a
    half dtype, converting LOGIT_BLOCK slots of k at a time (never the whole layer), or fp32."""
    q32 = qg.float()
    if k.dtype == torch.float32:
        return torch.matmul(q32, k.transpose(-1, -2)).mul_(scale)
    blocks = [
        torch.matmul(q32, k[:, :, start : start + LOGIT_BLOCK].float().transpose(-1, -2))
        for start in range(0, k.shape[2], LOGIT_BLOCK)
    ]
    logits = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
    return logits.mul_(scale)


# --------------------------------------------------------------------------------------------
# Triton kernels. Plain functions, jitted on first launch (see the module docstring). Each one is
# self-contained (no calls between jitted functions) so that lazy jitting needs no global rebinding.
# Slot addressing, shared by all three: a program walks "entries" idx = 0, 1, ...; dense, the
# entry is the slot; paged (PAGE_SIZE > 0), entry idx reads slot
# page_table[idx // PAGE_SIZE] * PAGE_SIZE + idx % PAGE_SIZE, and page -1 means "no page".
# --------------------------------------------------------------------------------------------


def _decode_partial_kernel(
    Q,  # (B, H_q, D)
    K,  # (B, H_kv, C, D)
    V,  # (B, H_kv, C, D)
    Lengths,  # (B, H_kv) int32
    SlotPos,  # (B, H_kv, C) int32, read only with a window
    QueryPos,  # (B,) int, read only with a window
    PageTable,  # (B, H_kv, n_pages) int32, read only when PAGE_SIZE > 0
    PartOut,  # (B, H_q, S, D) float32, normalised partial output of each split
    PartLse,  # (B, H_q, S) float32, log2-sum-exp2 of each split (-inf when it saw nothing)
    sm_scale_log2,  # scale * log2(e)
    window,
    capacity,
    n_pages,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Stage 1: one program per (batch, kv head, split) reduces its split for the whole group."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    kv_heads = tl.num_programs(1)
    n_splits = tl.num_programs(2)
    bg = b * kv_heads + g
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = bg * GROUP + offs_g  # flat (b, h) index of the group's query heads

    q = tl.load(
        Q + heads[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )  # (BLOCK_G, BLOCK_D)
    q = q.to(K.dtype.element_ty)
    if UPCAST:
        q = q.to(tl.float32)
    kv_base = bg.to(tl.int64) * capacity * HEAD_DIM
    slot_base = bg.to(tl.int64) * capacity
    length = tl.load(Lengths + bg)
    if PAGE_SIZE == 0:
        hi = tl.minimum(s * SPLIT + SPLIT, length)
    else:
        hi = tl.minimum(s * SPLIT + SPLIT, n_pages * PAGE_SIZE)
    if HAS_WINDOW:
        query_pos = tl.load(QueryPos + b)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(s * SPLIT, hi, BLOCK_N):
        idx = start + offs_n
        inside = idx < hi
        if PAGE_SIZE == 0:
            slots = idx
            valid = inside
        else:
            page = tl.load(PageTable + bg * n_pages + idx // PAGE_SIZE, mask=inside, other=-1)
            slots = page * PAGE_SIZE + idx % PAGE_SIZE
            valid = inside & (page >= 0) & (slots < length)
        if HAS_WINDOW:
            pos = tl.load(SlotPos + slot_base + slots, mask=valid, other=0)
            valid = valid & (query_pos - pos < window)
        kv_mask = valid[:, None] & mask_d[None, :]
        kv_offs = kv_base + slots[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        if UPCAST:
            k = k.to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
        logits = tl.where(valid[None, :], logits, float("-inf"))  # (BLOCK_G, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked rows stay NaN-free
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(logits - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
        p = p.to(V.dtype.element_ty)  # the P.V product in the cache's dtype, fp32 accumulation
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    part = heads * n_splits + s
    tl.store(PartLse + part, lse, mask=mask_g)
    tl.store(
        PartOut + part[:, None] * HEAD_DIM + offs_d[None, :],
        out,
        mask=mask_g[:, None] & mask_d[None, :],
    )


def _decode_merge_kernel(
    PartOut,  # (B, H_q, S, D) float32
    PartLse,  # (B, H_q, S) float32
    Out,  # (B, H_q, D) in q's dtype
    Lse,  # (B, H_q) float32, log2-sum-exp2 of the full row
    n_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Stage 2: one program per (batch, query head) merges the splits in a fixed order."""
    row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s in range(0, n_splits):
        lse_s = tl.load(PartLse + row * n_splits + s)
        out_s = tl.load(PartOut + (row * n_splits + s) * HEAD_DIM + offs_d, mask=mask_d, other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        weight = tl.exp2(lse_s - m_safe)
        acc = acc * alpha + weight * out_s
        l_i = l_i * alpha + weight
        m_i = m_new
    seen = l_i > 0.0
    tl.store(Lse + row, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")))
    out = acc / tl.where(seen, l_i, 1.0)
    tl.store(Out + row * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)


def _decode_emit_kernel(
    Q,  # (B, H_q, D)
    K,  # (B, H_kv, C, D)
    Lengths,  # (B, H_kv) int32
    SlotPos,  # (B, H_kv, C) int32
    QueryPos,  # (B,) int
    PageTable,  # (B, H_kv, n_pages) int32
    Lse,  # (B, H_q) float32 from stage 2
    Norms,  # (B, H_q, C) float32, read only when HAS_NORMS
    Mass,  # (B, H_kv, C) float32, zero-initialised
    Contribution,  # (B, H_kv, C) float32, zero-initialised, written only when HAS_NORMS
    sm_scale_log2,
    window,
    capacity,
    n_pages,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_NORMS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Emission: one program per (batch, kv head, slot block) recomputes q.k, reads no V."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    start = tl.program_id(2) * BLOCK_N
    kv_heads = tl.num_programs(1)
    bg = b * kv_heads + g
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = bg * GROUP + offs_g

    q = tl.load(
        Q + heads[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )
    q = q.to(K.dtype.element_ty)
    if UPCAST:
        q = q.to(tl.float32)
    lse = tl.load(Lse + heads, mask=mask_g, other=0.0)  # (BLOCK_G,)
    slot_base = bg.to(tl.int64) * capacity
    length = tl.load(Lengths + bg)
    idx = start + tl.arange(0, BLOCK_N)
    if PAGE_SIZE == 0:
        slots = idx
        valid = idx < length
    else:
        inside = idx < n_pages * PAGE_SIZE
        page = tl.load(PageTable + bg * n_pages + idx // PAGE_SIZE, mask=inside, other=-1)
        slots = page * PAGE_SIZE + idx % PAGE_SIZE
        valid = inside & (page >= 0) & (slots < length)
    if HAS_WINDOW:
        query_pos = tl.load(QueryPos + b)
        pos = tl.load(SlotPos + slot_base + slots, mask=valid, other=0)
        valid = valid & (query_pos - pos < window)

    k = tl.load(
        K + slot_base * HEAD_DIM + slots[:, None] * HEAD_DIM + offs_d[None, :],
        mask=valid[:, None] & mask_d[None, :],
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
    logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
    keep = mask_g[:, None] & valid[None, :]
    probs = tl.where(keep, tl.exp2(logits - lse[:, None]), 0.0)  # (BLOCK_G, BLOCK_N)
    tl.store(Mass + slot_base + slots, tl.sum(probs, 0), mask=valid)
    if HAS_NORMS:
        norms = tl.load(
            Norms + heads[:, None].to(tl.int64) * capacity + slots[None, :], mask=keep, other=0.0
        )
        tl.store(Contribution + slot_base + slots, tl.sum(probs * norms, 0), mask=valid)


@functools.cache
def _jit(fn):
    """triton.jit on first use: reads TRITON_INTERPRET at launch time, not at import time."""
    return triton.jit(fn)


def interpreter_upcast(dtype: torch.dtype) -> bool:
    """Under TRITON_INTERPRET=1, tl.dot on bf16 operands returns garbage (triton 3.9; fp16 is
    fine), so the kernels cast the (already rounded) operands to fp32 there; the GPU never does."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when Triton is importable (CUDA, or the CPU interpreter under TRITON_INTERPRET=1)."""
    return triton is not None


def expect_shape(name: str, tensor: torch.Tensor, expected: tuple[int | None, ...]) -> None:
    """Raises ValueError unless `tensor` has shape `expected` (None: any size), naming the
    tensor, the expected and the given shape. Real errors, not asserts: `python -O` keeps them."""
    shape = tuple(tensor.shape)
    if len(shape) == len(expected) and all(
        want is None or want == got for want, got in zip(expected, shape, strict=True)
    ):
        return
    wanted = ", ".join("*" if want is None else str(want) for want in expected)
    wanted += "," if len(expected) == 1 else ""  # written as a tuple, like the given shape
    raise ValueError(f"{name} must have shape ({wanted}), got {shape}")


def check_layout(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    slot_pos: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    value_norms: torch.Tensor | None = None,
    page_table: torch.Tensor | None = None,
) -> None:
    """Raises ValueError for arguments that do not fit the decode-attention contract: q
    (B, H_q, D); k, v (B, H_kv, C, D) of one dtype with H_kv dividing H_q; lengths (B, H_kv);
    slot_pos (B, H_kv, C); query_pos (B,); value_norms (B, H_q, C); page_table (B, H_kv, K).
    Arguments that fit pass one comparison of shapes (this runs every layer of every step);
    the others get the check that names what is wrong."""
    if _fits(q, k, v, lengths, slot_pos, query_pos, value_norms, page_table):
        return
    expect_shape("q", q, (None, None, None))
    batch, q_heads, head_dim = q.shape
    expect_shape("k", k, (batch, None, None, head_dim))
    expect_shape("v", v, tuple(k.shape))
    kv_heads, capacity = k.shape[1], k.shape[2]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q's {q_heads} query heads do not split into k's {kv_heads} kv heads")
    if k.dtype != v.dtype:
        raise ValueError(f"k and v must share a dtype, got {k.dtype} and {v.dtype}")
    expect_shape("lengths", lengths, (batch, kv_heads))
    if slot_pos is not None:
        expect_shape("slot_pos", slot_pos, (batch, kv_heads, capacity))
    if query_pos is not None:
        expect_shape("query_pos", query_pos, (batch,))
    if value_norms is not None:
        expect_shape("value_norms", value_norms, (batch, q_heads, capacity))
    if page_table is not None:
        expect_shape("page_table", page_table, (batch, kv_heads, None))


def _fits(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    slot_pos: torch.Tensor | None,
    query_pos: torch.Tensor | None,
    value_norms: torch.Tensor | None,
    page_table: torch.Tensor | None,
) -> bool:
    """`check_layout`'s contract in one pass of comparisons."""
    if q.dim() != 3 or k.dim() != 4:
        return False
    batch, q_heads, head_dim = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    return (
        k.shape[0] == batch
        and k.shape[3] == head_dim
        and v.shape == k.shape
        and kv_heads > 0
        and q_heads % kv_heads == 0
        and k.dtype == v.dtype
        and lengths.shape == (batch, kv_heads)
        and (slot_pos is None or slot_pos.shape == (batch, kv_heads, capacity))
        and (query_pos is None or query_pos.shape == (batch,))
        and (value_norms is None or value_norms.shape == (batch, q_heads, capacity))
        and (
            page_table is None
            or (page_table.dim() == 3 and page_table.shape[:2] == (batch, kv_heads))
        )
    )


def decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    slot_pos: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    sliding_window: int | None = None,
    value_norms: torch.Tensor | None = None,
    emit: bool = False,
    page_table: torch.Tensor | None = None,
    page_size: int = 16,
    block_n: int = BLOCK_N,
    split_size: int = SPLIT_SIZE,
) -> tuple[torch.Tensor, Emitted | None]:
    """Launch the split-K kernels (same contract as the reference).

    With ``page_table`` (B, H_kv, K) int32, only the listed pages of ``page_size`` slots are read
    (entries of -1 are skipped; pages must not repeat); the emitted mass is 0 on unread slots.
    ``block_n`` and ``split_size`` are exposed for the tests (small shapes, several splits).
    """
    check_layout(q, k, v, lengths, slot_pos, query_pos, value_norms, page_table)
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("k and v must be contiguous (the arena's layer views are)")
    if block_n < 16 or split_size % block_n:
        raise ValueError(
            f"block_n must be >= 16 and divide split_size, got block_n {block_n}, "
            f"split_size {split_size}"
        )
    if sliding_window is not None and (slot_pos is None or query_pos is None):
        raise ValueError("a sliding window needs slot_pos and query_pos")
    batch, q_heads, head_dim = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    device = q.device
    q = q.contiguous()
    lengths = lengths.to(torch.int32).contiguous()
    dummy = torch.zeros(1, dtype=torch.int32, device=device)  # for pointers a mode never reads
    slot_pos = dummy if sliding_window is None else slot_pos.to(torch.int32).contiguous()
    query_pos = dummy if sliding_window is None else query_pos.contiguous()
    paged = page_table is not None
    page_table = page_table.to(torch.int32).contiguous() if paged else dummy
    n_pages = page_table.shape[2] if paged else 0
    n_entries = n_pages * page_size if paged else capacity
    n_splits = max(1, triton.cdiv(n_entries, split_size))
    common = dict(
        sm_scale_log2=scale * LOG2E,
        window=sliding_window or 0,
        capacity=capacity,
        n_pages=n_pages,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE_SIZE=page_size if paged else 0,
        HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if k.dtype == torch.float32 else "tf32",
        UPCAST=interpreter_upcast(k.dtype),
    )

    part_out = torch.empty(batch, q_heads, n_splits, head_dim, dtype=torch.float32, device=device)
    part_lse = torch.empty(batch, q_heads, n_splits, dtype=torch.float32, device=device)
    _jit(_decode_partial_kernel)[(batch, kv_heads, n_splits)](
        q,
        k,
        v,
        lengths,
        slot_pos,
        query_pos,
        page_table,
        part_out,
        part_lse,
        SPLIT=split_size,
        **common,
    )
    out = torch.empty_like(q)
    lse = torch.empty(batch, q_heads, dtype=torch.float32, device=device)
    _jit(_decode_merge_kernel)[(batch, q_heads)](
        part_out,
        part_lse,
        out,
        lse,
        n_splits,
        HEAD_DIM=head_dim,
        BLOCK_D=common["BLOCK_D"],
    )
    if not emit:
        return out, None

    has_norms = value_norms is not None
    mass = torch.zeros(batch, kv_heads, capacity, dtype=torch.float32, device=device)
    contribution = torch.zeros_like(mass) if has_norms else None
    norms = value_norms.float().contiguous() if has_norms else dummy
    _jit(_decode_emit_kernel)[(batch, kv_heads, triton.cdiv(n_entries, block_n))](
        q,
        k,
        lengths,
        slot_pos,
        query_pos,
        page_table,
        lse,
        norms,
        mass,
        contribution if has_norms else mass,
        HAS_NORMS=has_norms,
        **common,
    )
    return out, Emitted(mass=mass, contribution=contribution)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    slot_pos: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    sliding_window: int | None = None,
    value_norms: torch.Tensor | None = None,
    emit: bool = False,
) -> tuple[torch.Tensor, Emitted | None]:
    """Public dispatcher: the Triton kernel on CUDA, the torch path elsewhere."""
    run = decode_attention_triton if q.is_cuda and triton_available() else decode_attention_torch
    return run(
        q,
        k,
        v,
        lengths,
        scale=scale,
        slot_pos=slot_pos,
        query_pos=query_pos,
        sliding_window=sliding_window,
        value_norms=value_norms,
        emit=emit,
    )
