"""Prefill attention statistics for the scoring policies, one sequence at a time.

- ``window_attention``: the softmax attention of a few queries (SnapKV's / LaProx's observation
  window) to every prompt key, (H_q, w, n). Small (w << n), so plain torch.
- ``probe_attention``: KVzip's probe rows through one layer's attention (over the whole
  document and the probe's own keys) and, from the same logits, each span key's max over the
  rows of its softmax probability among the scored keys (sinks, span, the probe's own). The rows
  are as many as the span's keys, so no (H_q, rows, keys) matrix is built: they go through in
  tiles of one GQA group and a few rows whose logits stay in cache (on CPU a fresh tensor of
  tens of MB costs more in page faults than its arithmetic), and the probe's model pass and
  its scoring share the QK^T and the exponentials.
- ``column_statistics``: statistics of the full causal prompt attention, never an n x n matrix:
  plain column sums (H2O) and AUV's row-scaled column means. On CPU a chunked torch loop
  (O(G x chunk x n) memory); on CUDA two Triton passes in the flash-attention-backward pattern:
  pass 1 stores each row's log-sum-exp, pass 2 walks the queries of each key block and sums the
  probabilities recomputed from that LSE (O(n) memory, no atomics, deterministic).

Visibility: query i sees key j iff ``pos_j <= pos_i`` and, with a sliding window,
``pos_i - pos_j < sliding_window``. Positions must be strictly increasing (a prompt's are), which
lets the counts and loop bounds come from ``searchsorted`` instead of a mask.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanokv.kernels.decode_attention import expect_shape, interpreter_upcast

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch paths still work
    triton = None
    tl = None

LOG2E = 1.4426950408889634


@dataclass
class ColumnStats:
    """Per-key statistics of the causal prompt attention of one sequence."""

    sums: torch.Tensor  # (H_q, n) float32, sum_i a[i, j] over all queries (H2O)
    auv_means: torch.Tensor  # (H_q, n) float32, mean over the rows that see j of a[i, j] N_i/N_max


def check_prompt(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> None:
    """Raises ValueError unless q (H_q, n, D), k (H_kv, n, D) with H_kv dividing H_q, and
    positions (n,) fit together (real errors: `python -O` keeps them)."""
    expect_shape("q", q, (None, None, None))
    q_heads, n, head_dim = q.shape
    expect_shape("k", k, (None, n, head_dim))
    _check_groups(q_heads, k.shape[0])
    expect_shape("positions", positions, (n,))


def _check_groups(q_heads: int, kv_heads: int) -> None:
    """Raises ValueError unless the query heads split evenly into GQA groups of kv heads."""
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q's {q_heads} query heads do not split into k's {kv_heads} kv heads")


def _visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool (w, n): query i sees key j."""
    diff = query_pos.view(-1, 1) - key_pos.view(1, -1)
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask


def window_attention(
    q_window: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal softmax attention of ``w`` queries to ``n`` keys, float32 (H_q, w, n).

    q_window: (H_q, w, D); k: (H_kv, n, D); query_positions: (w,); key_positions: (n,).
    A row that sees no key is all zeros.
    """
    expect_shape("q_window", q_window, (None, None, None))
    q_heads, w, head_dim = q_window.shape
    expect_shape("k", k, (None, None, head_dim))
    _check_groups(q_heads, k.shape[0])
    expect_shape("query_positions", query_positions, (w,))
    expect_shape("key_positions", key_positions, (k.shape[1],))
    kv_heads, n, _ = k.shape
    group = q_heads // kv_heads
    qg = q_window.float().view(kv_heads, group, w, head_dim)
    logits = torch.einsum("gqwd,gnd->gqwn", qg, k.float()) * scale  # (H_kv, G, w, n)
    mask = _visible(query_positions, key_positions, sliding_window)  # (w, n)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return probs.nan_to_num(0.0).reshape(q_heads, w, n)


def _row_tiles(
    query_positions: torch.Tensor, other_positions: torch.Tensor, rows: int
) -> list[tuple[int, int, int, int]]:
    """(r0, r1, seen_by_all, seen) per tile of `rows` queries: the other keys (ascending
    positions) the tile's first query sees, all of which every later one sees too, and those
    its last query sees (none after them is seen). One tile needs no bounds (no host sync: it
    masks every other key); more take them from one searchsorted."""
    w, others = query_positions.shape[0], other_positions.shape[0]
    if rows >= w:
        return [(0, w, 0, others)]
    counts = torch.searchsorted(other_positions, query_positions, right=True).tolist()
    return [
        (r0, min(r0 + rows, w), counts[r0], counts[min(r0 + rows, w) - 1])
        for r0 in range(0, w, rows)
    ]


SCORE_GAP = 20.0  # nats: see probe_attention


def probe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    positions: torch.Tensor,
    document: int,
    span: tuple[int, int],
    sinks: int,
    sliding_window: int | None = None,
    tile_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KVzip's probe rows through one layer's attention, scored on the way.

    q: (c, H_q, D) the rows, the last c of the segment's keys; k, v: (T, H_kv, D) the
    `document`'s keys, then the segment's; positions: (T,) ascending. Returns the rows'
    attention output (c, H_q * D) in q's dtype, over every document key and the segment's keys
    up to the row's own (``prefill_attention``'s), and float32 (H_q, end - start) the max over
    the rows of each span key's probability in the softmax over the first `sinks` keys, the
    span [start, end) and the segment's keys (KVzip's score). Both come from the
    same exponentials exp(x - max over the row's keys); a tile where some row's scored keys sum
    to less than exp(-SCORE_GAP) of it (their exponentials could underflow) scores from their
    own softmax instead, so every score above ~1e-29 is exact to rounding.
    """
    c, q_heads, head_dim = q.shape
    expect_shape("k", k, (None, None, head_dim))
    _check_groups(q_heads, k.shape[1])
    expect_shape("v", v, k.shape)
    expect_shape("positions", positions, (k.shape[0],))
    kv_heads, group, keys = k.shape[1], q_heads // k.shape[1], k.shape[0]
    if tile_elements is None:
        tile_elements = 1 << 19 if q.device.type == "cpu" else 1 << 26
    rows = max(1, tile_elements // (group * keys))
    query_pos = positions[-c:]
    own = positions[document:]  # the segment's positions: a row sees a prefix of them
    parts = _key_parts(document, span, sinks)
    scaled = (q.float() * scale).transpose(0, 1)  # (H_q, c, D)
    out = torch.empty(q_heads, c, head_dim, dtype=torch.float32, device=q.device)
    best = torch.zeros(q_heads, span[1] - span[0], dtype=torch.float32, device=q.device)
    for g in range(kv_heads):
        heads = slice(g * group, (g + 1) * group)
        keys_t, values = k[:, g].float().T, v[:, g].float()  # (D, T), (T, D)
        for r0, r1, seen_by_all, seen in _row_tiles(query_pos, own, rows):
            first = 0 if sliding_window is not None else document + seen_by_all
            last = document + seen
            hidden = ~_visible(query_pos[r0:r1], positions[first:last], sliding_window)
            rows_q = scaled[heads, r0:r1].reshape(-1, head_dim)  # (G * b, D): one GEMM
            logits = functools.partial(_tile_logits, rows_q, keys_t[:, :last], first, hidden)
            out[heads, r0:r1], score = _probe_tile(logits, values[:last], parts)
            torch.maximum(best[heads], score, out=best[heads])
    return out.transpose(0, 1).reshape(c, -1).to(q.dtype), best


def _key_parts(document: int, span: tuple[int, int], sinks: int) -> tuple[slice, ...]:
    """The keys in five ranges, the score's softmax over the even ones: the sinks, the rest of
    the document before the span, the span, the document after it, the segment's own keys."""
    start, end = span
    return (
        slice(0, sinks),
        slice(sinks, start),
        slice(start, end),
        slice(end, document),
        slice(document, None),
    )


def _tile_logits(
    rows_q: torch.Tensor, keys_t: torch.Tensor, first: int, hidden: torch.Tensor
) -> torch.Tensor:
    """(G, b, K) logits of one group's scaled rows (G * b, D) against keys_t (D, K), -inf where
    `hidden` (b, K - first) says a row does not see a key (from key `first` on)."""
    logits = (rows_q @ keys_t).view(-1, hidden.shape[0], keys_t.shape[1])
    logits[..., first:].masked_fill_(hidden, -math.inf)
    return logits


def _probe_tile(
    logits: Callable[[], torch.Tensor], values: torch.Tensor, parts: tuple[slice, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile of ``probe_attention``: logits() the tile's masked logits (G, b, K), values
    (K, D) float32, parts from ``_key_parts``. Returns the attention output (G, b, D) over all K
    keys and (G, S) the rows' max of the span keys' probabilities in the softmax over the
    scored parts, from the same exp(x - row max) and one sum per part (the logits are
    recomputed on the rare path that needs them after the exp)."""
    weights = logits()
    weights = weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()  # a row sees its own key
    sums = [weights[..., part].sum(dim=-1, keepdim=True) for part in parts]  # (G, b, 1) each
    out = (weights @ values).div_(sum(sums))
    scored = sums[0] + sums[2] + sums[4]
    if float(scored.min()) < math.exp(-SCORE_GAP):  # rare: the scored keys' own softmax
        return out, _scored_softmax_max(logits(), parts)
    return out, weights[..., parts[2]].div_(scored).amax(dim=1)


def _scored_softmax_max(logits: torch.Tensor, parts: tuple[slice, ...]) -> torch.Tensor:
    """(G, S): the rows' max of the span keys' probabilities in a softmax over the scored
    parts of logits (G, b, K) alone."""
    scored = torch.cat([logits[..., part] for part in parts[::2]], dim=-1)
    first = parts[0].stop - parts[0].start
    span = parts[2].stop - parts[2].start
    return torch.softmax(scored, dim=-1)[..., first : first + span].amax(dim=1)


def visible_counts(
    positions: torch.Tensor, sliding_window: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), int64 (n,) each: keys each query sees, queries that see each key.

    positions: (n,) strictly increasing. O(n log n), no mask.
    """
    pos = positions.to(torch.int64)
    if pos.numel() > 1 and not bool((pos[1:] > pos[:-1]).all()):
        raise ValueError("prefill positions must be strictly increasing")
    n = pos.numel()
    index = torch.arange(n, device=pos.device)
    if sliding_window is None:
        return index + 1, n - index
    first_key = torch.searchsorted(pos, pos - sliding_window, right=True)
    last_query = torch.searchsorted(pos, pos + sliding_window, right=False)
    return index + 1 - first_key, last_query - index


def column_statistics_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    positions: torch.Tensor,
    sliding_window: int | None = None,
    chunk: int = 256,
) -> ColumnStats:
    """Chunked torch column statistics: per kv head, ``chunk`` queries at a time.

    q: (H_q, n, D); k: (H_kv, n, D); positions: (n,). Each step holds (G, chunk, keys) with keys
    limited to those the chunk can see (causal, window).
    """
    check_prompt(q, k, positions)
    q_heads, n, _ = q.shape
    kv_heads = k.shape[0]
    group = q_heads // kv_heads
    pos = positions.to(torch.int64)
    rows, cols = visible_counts(pos, sliding_window)
    sums = torch.zeros(q_heads, n, dtype=torch.float32, device=q.device)
    weighted = torch.zeros_like(sums)  # sum_i a[i, j] * N_i
    for g in range(kv_heads):
        heads = slice(g * group, (g + 1) * group)
        kg = k[g].float()  # (n, D)
        for i0 in range(0, n, chunk):
            i1 = min(i0 + chunk, n)
            j0 = i0 + 1 - int(rows[i0])  # the chunk's first query sees its oldest key
            logits = q[heads, i0:i1].float() @ kg[j0:i1].T * scale  # (G, c, i1 - j0)
            mask = _visible(pos[i0:i1], pos[j0:i1], sliding_window)
            probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
            sums[heads, j0:i1] += probs.sum(dim=1)
            weighted[heads, j0:i1] += (probs * rows[i0:i1, None]).sum(dim=1)
    auv_means = weighted / (rows.max() * cols)
    return ColumnStats(sums=sums, auv_means=auv_means)


def _row_lse_kernel(
    Q,  # (H_q, n, D)
    K,  # (H_kv, n, D)
    Pos,  # (n,) int64, strictly increasing
    KeyLo,  # (cdiv(n, BLOCK_M),) int32: first key any query of the block sees
    Lse,  # (H_q, n) float32, log2-sum-exp2 of each row
    sm_scale_log2,
    window,
    n,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Pass 1: one program per (query head, query block) reduces its rows to a log-sum-exp."""
    h = tl.program_id(0)
    block = tl.program_id(1)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n
    mask_d = offs_d < HEAD_DIM
    q_base = h.to(tl.int64) * n * HEAD_DIM
    k_base = (h // GROUP).to(tl.int64) * n * HEAD_DIM
    q = tl.load(
        Q + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    ).to(K.dtype.element_ty)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.load(Pos + offs_m, mask=mask_m, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    lo = tl.load(KeyLo + block)
    hi = tl.minimum(block * BLOCK_M + BLOCK_M, n)  # causal: keys up to the block's last query
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        k = tl.load(
            K + k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        k_pos = tl.load(Pos + offs_n, mask=mask_n, other=0)
        diff = q_pos[:, None] - k_pos[None, :]
        seen = mask_m[:, None] & mask_n[None, :] & (diff >= 0)
        if HAS_WINDOW:
            seen = seen & (diff < window)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
        logits = tl.where(seen, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(logits - m_safe[:, None]), 1)
        m_i = m_new
    has = l_i > 0.0
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(Lse + h.to(tl.int64) * n + offs_m, lse, mask=mask_m)


def _column_stats_kernel(
    Q,  # (H_q, n, D)
    K,  # (H_kv, n, D)
    Pos,  # (n,) int64
    Lse,  # (H_q, n) float32 from pass 1
    Rows,  # (n,) float32, N_i
    QueryHi,  # (cdiv(n, BLOCK_N),) int32: one past the last query that sees the block
    Sums,  # (H_q, n) float32
    Weighted,  # (H_q, n) float32, sum_i a[i, j] * N_i
    sm_scale_log2,
    window,
    n,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Pass 2: one program per (query head, key block) walks the queries that can see it."""
    h = tl.program_id(0)
    block = tl.program_id(1)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < n
    mask_d = offs_d < HEAD_DIM
    q_base = h.to(tl.int64) * n * HEAD_DIM
    k_base = (h // GROUP).to(tl.int64) * n * HEAD_DIM
    k = tl.load(
        K + k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_n[:, None] & mask_d[None, :],
        other=0.0,
    )  # (BLOCK_N, BLOCK_D)
    if UPCAST:
        k = k.to(tl.float32)
    k_pos = tl.load(Pos + offs_n, mask=mask_n, other=0)

    sums = tl.zeros([BLOCK_N], tl.float32)
    weighted = tl.zeros([BLOCK_N], tl.float32)
    lo = (block * BLOCK_N // BLOCK_M) * BLOCK_M  # causal: queries from the block's first key on
    hi = tl.load(QueryHi + block)
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n
        q = tl.load(
            Q + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        ).to(K.dtype.element_ty)
        if UPCAST:
            q = q.to(tl.float32)
        q_pos = tl.load(Pos + offs_m, mask=mask_m, other=0)
        lse = tl.load(Lse + h.to(tl.int64) * n + offs_m, mask=mask_m, other=0.0)
        rows = tl.load(Rows + offs_m, mask=mask_m, other=0.0)
        diff = q_pos[:, None] - k_pos[None, :]
        seen = mask_m[:, None] & mask_n[None, :] & (diff >= 0)
        if HAS_WINDOW:
            seen = seen & (diff < window)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
        probs = tl.where(seen, tl.exp2(logits - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
        sums += tl.sum(probs, 0)
        weighted += tl.sum(probs * rows[:, None], 0)
    out = h.to(tl.int64) * n + offs_n
    tl.store(Sums + out, sums, mask=mask_n)
    tl.store(Weighted + out, weighted, mask=mask_n)


@functools.cache
def _jit(fn):
    """triton.jit on first use, so TRITON_INTERPRET is read at launch time."""
    return triton.jit(fn)


def column_statistics_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    positions: torch.Tensor,
    sliding_window: int | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> ColumnStats:
    """Two-pass Triton column statistics (same result as ``column_statistics_torch``)."""
    check_prompt(q, k, positions)
    q_heads, n, head_dim = q.shape
    kv_heads = k.shape[0]
    if min(block_m, block_n) < 16:
        raise ValueError(f"tl.dot needs blocks of at least 16, got {block_m} x {block_n}")
    q, k = q.contiguous(), k.contiguous()
    pos = positions.to(torch.int64).contiguous()
    rows, cols = visible_counts(pos, sliding_window)
    # Loop bounds per block, from the counts: keys [i - N_i + 1, i], queries [j, j + R_j - 1].
    first_key = torch.arange(n, device=q.device) + 1 - rows
    key_lo = first_key[::block_m].to(torch.int32)  # the block's first query sees the oldest keys
    key_lo = (key_lo // block_n * block_n).contiguous()
    last_query = torch.arange(n, device=q.device) + cols  # one past
    block_last_key = torch.arange(0, n, block_n, device=q.device) + block_n - 1
    query_hi = last_query[block_last_key.clamp(max=n - 1)]  # the block's last key is seen longest
    query_hi = query_hi.to(torch.int32).contiguous()
    common = dict(
        sm_scale_log2=scale * LOG2E,
        window=sliding_window or 0,
        n=n,
        GROUP=q_heads // kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if k.dtype == torch.float32 else "tf32",
        UPCAST=interpreter_upcast(k.dtype),
    )
    lse = torch.empty(q_heads, n, dtype=torch.float32, device=q.device)
    _jit(_row_lse_kernel)[(q_heads, triton.cdiv(n, block_m))](q, k, pos, key_lo, lse, **common)
    sums = torch.empty_like(lse)
    weighted = torch.empty_like(lse)
    _jit(_column_stats_kernel)[(q_heads, triton.cdiv(n, block_n))](
        q, k, pos, lse, rows.float().contiguous(), query_hi, sums, weighted, **common
    )
    return ColumnStats(sums=sums, auv_means=weighted / (rows.max() * cols))


def column_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    positions: torch.Tensor,
    sliding_window: int | None = None,
    chunk: int = 256,
) -> ColumnStats:
    """Column sums (H2O) and AUV row-scaled column means of the causal prompt attention.

    q: (H_q, n, D); k: (H_kv, n, D) (after RoPE); positions: (n,) strictly increasing. AUV: row i
    is scaled by ``N_i / N_max`` (keys it sees over the most any row sees), then each column is
    averaged over the rows that see it. Triton on CUDA, chunked torch (``chunk`` queries) elsewhere.
    """
    if q.is_cuda and triton is not None:
        return column_statistics_triton(
            q, k, scale=scale, positions=positions, sliding_window=sliding_window
        )
    return column_statistics_torch(
        q, k, scale=scale, positions=positions, sliding_window=sliding_window, chunk=chunk
    )
