"""Quest (Tang et al. 2024): query-aware page selection, then attention over the chosen pages.

Slots of a kv head are grouped in pages of ``page_size`` (16). Per page the element-wise min and
max of its valid keys bound every logit in it: for q and any key k of the page,
``q . k <= sum_i max(q_i kmax_i, q_i kmin_i)``. Each decode step ranks pages by that bound, keeps
the top ones that fit a token budget (always with the page being written), and attends only to
them. Quest reduces the bytes read per step, not the memory held.

Bounds, ranking and selection are small torch ops; the attention reuses the split-K Triton kernels
of ``decode_attention`` in their page-table mode (``sparse_decode_attention``), with a torch
reference that is the dense reference restricted to the selected pages. Without Triton (CPU),
``sparse_decode_attention_torch`` reads only the listed pages' K/V, so reading 10% of the pages
reads ~10% of the K/V (the reference reads it all): without emission the C kernel of
``cpu_attention.py`` attends over the layer under the listed pages' mask and skips the others'
slots where they lie; with emission (or where the C kernel does not apply) the listed pages
are copied out of the arena and attended alone.

Empty pages (no valid slot) hold ``kmin = +inf, kmax = -inf``, the identities of min / max.
"""

from __future__ import annotations

import torch

from nanokv.kernels.cpu_attention import applies, cpu_decode_attention
from nanokv.kernels.decode_attention import (
    Emitted,
    check_layout,
    decode_attention_triton,
    masked_attention_reference,
    masked_attention_torch,
    triton_available,
    valid_slot_mask,
)

PAGE_SIZE = 16


def _num_pages(capacity: int, page_size: int) -> int:
    return -(-capacity // page_size)


def page_bounds(
    k: torch.Tensor, lengths: torch.Tensor, page_size: int = PAGE_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise (kmin, kmax) of the valid keys of each page, each (B, H_kv, P, D) in k's dtype.

    k: (B, H_kv, C, D); lengths: (B, H_kv); P = ceil(C / page_size). Slots at or past the length
    are ignored; a page with no valid slot gets (+inf, -inf).
    """
    batch, kv_heads, capacity, head_dim = k.shape
    pages = _num_pages(capacity, page_size)
    valid = torch.arange(pages * page_size, device=k.device) < lengths.unsqueeze(-1)  # (B,H,P*ps)
    padded = torch.nn.functional.pad(k, (0, 0, 0, pages * page_size - capacity))
    valid = valid.unsqueeze(-1)
    shape = (batch, kv_heads, pages, page_size, head_dim)
    kmin = padded.masked_fill(~valid, float("inf")).view(shape).amin(dim=3)
    kmax = padded.masked_fill(~valid, float("-inf")).view(shape).amax(dim=3)
    return kmin, kmax


def update_page_bounds(
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    k: torch.Tensor,
    lengths: torch.Tensor,
    slots: torch.Tensor,
    page_size: int = PAGE_SIZE,
) -> None:
    """Recompute, in place, the bounds of the pages holding ``slots`` (B, H_kv, T).

    Call after writing or scattering keys into those slots (and after any change of ``lengths``
    that touches them). A touched page is recomputed from all its valid slots, not merged with the
    new key: a scatter replaces an evicted key, which may have been the page's min or max. The
    bounds may be held in a wider dtype than k (fp32 bounds of a bf16 arena).
    """
    batch, kv_heads, capacity, head_dim = k.shape
    pages = slots.long() // page_size  # (B, H_kv, T)
    members = pages.unsqueeze(-1) * page_size + torch.arange(page_size, device=k.device)
    valid = members < lengths.view(batch, kv_heads, 1, 1).clamp(max=capacity)  # (B,H_kv,T,ps)
    flat = members.clamp(max=capacity - 1).flatten(2)  # (B, H_kv, T * ps)
    keys = k.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, head_dim))
    keys = keys.view(*members.shape, head_dim)  # (B, H_kv, T, ps, D)
    valid = valid.unsqueeze(-1)
    new_min = keys.masked_fill(~valid, float("inf")).amin(dim=3)  # (B, H_kv, T, D)
    new_max = keys.masked_fill(~valid, float("-inf")).amax(dim=3)
    index = pages.unsqueeze(-1).expand(-1, -1, -1, head_dim)
    kmin.scatter_(2, index, new_min.to(kmin.dtype))  # a page listed twice: same value twice
    kmax.scatter_(2, index, new_max.to(kmax.dtype))


def merge_page_bounds(
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    k_new: torch.Tensor,
    slots: torch.Tensor,
    page_size: int = PAGE_SIZE,
) -> None:
    """Folds keys just appended, k_new (B, H_kv, D) at `slots` (B, H_kv), into their pages'
    bounds in place. Exact for an append (the page's other keys did not change; a page that was
    empty holds (+inf, -inf), the identities), and a handful of ops where `update_page_bounds`
    recomputes the page: what a decode step needs. After a scatter use `update_page_bounds`."""
    index = (slots.long() // page_size).unsqueeze(-1)  # (B, H_kv, 1)
    index = index.unsqueeze(-1).expand(-1, -1, 1, kmin.shape[-1])  # (B, H_kv, 1, D)
    new = k_new.unsqueeze(2).to(kmin.dtype)  # (B, H_kv, 1, D)
    kmin.scatter_(2, index, torch.minimum(kmin.gather(2, index), new))
    kmax.scatter_(2, index, torch.maximum(kmax.gather(2, index), new))


def page_upper_bound(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, scale: float
) -> torch.Tensor:
    """``scale * sum_i max(q_i kmax_i, q_i kmin_i)`` per query head and page, float32 (B, H_q, P).

    q: (B, H_q, D); kmin, kmax: (B, H_kv, P, D). Computed as ``q+ . kmax + q- . kmin`` (two small
    matmuls, no (P, D) temporary per head). Empty pages are -inf.
    """
    batch, q_heads, head_dim = q.shape
    kv_heads, pages = kmin.shape[1], kmin.shape[2]
    qg = q.float().view(batch, kv_heads, q_heads // kv_heads, head_dim)  # (B, H_kv, G, D)
    lo, hi = kmin.float(), kmax.float()
    bound = qg.clamp(min=0) @ hi.transpose(-1, -2) + qg.clamp(max=0) @ lo.transpose(-1, -2)
    empty = (lo[..., 0] > hi[..., 0]).unsqueeze(2)  # (B, H_kv, 1, P)
    bound = (bound * scale).masked_fill(empty, float("-inf"))
    return bound.view(batch, q_heads, pages)


def select_pages(
    bound: torch.Tensor,
    lengths: torch.Tensor,
    token_budget: int,
    page_size: int = PAGE_SIZE,
    reduce: str = "max",
) -> torch.Tensor:
    """Page table (B, H_kv, K) int32 of the pages to read, ascending, -1 where a head has fewer.

    bound: (B, H_q, P) from ``page_upper_bound``; the query heads of a group are combined by
    ``reduce`` ("max" or "mean"). K = token_budget // page_size (at least 1, at most P). The last
    valid page (the one being written) is always included; pages past the length never are; ties
    go to the lower page index.
    """
    batch, q_heads, pages = bound.shape
    kv_heads = lengths.shape[1]
    grouped = bound.view(batch, kv_heads, q_heads // kv_heads, pages)
    if reduce == "max":
        score = grouped.amax(dim=2)
    elif reduce == "mean":
        score = grouped.mean(dim=2)
    else:
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    n_valid = (lengths.long() + page_size - 1) // page_size  # (B, H_kv)
    index = torch.arange(pages, device=bound.device)
    score = score.nan_to_num(nan=float("-inf"))
    score = score.masked_fill(index >= n_valid.unsqueeze(-1), float("-inf"))
    score = score.masked_fill(index == n_valid.unsqueeze(-1) - 1, float("inf"))
    keep = max(1, min(token_budget // page_size, pages))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :keep]
    order = order.masked_fill(order >= n_valid.unsqueeze(-1), pages)  # unused entries last
    table = order.sort(dim=-1).values
    return table.masked_fill(table == pages, -1).to(torch.int32)


def page_table_mask(page_table: torch.Tensor, capacity: int, page_size: int) -> torch.Tensor:
    """Bool (B, H_kv, C): the slot's page is listed in ``page_table`` (B, H_kv, K)."""
    batch, kv_heads, _ = page_table.shape
    pages = _num_pages(capacity, page_size)
    listed = torch.zeros(batch, kv_heads, pages + 1, dtype=torch.bool, device=page_table.device)
    listed.scatter_(2, page_table.long().masked_fill(page_table < 0, pages), True)
    slot_page = torch.arange(capacity, device=page_table.device) // page_size
    return listed[..., slot_page]


def sparse_decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    page_table: torch.Tensor,
    *,
    scale: float,
    page_size: int = PAGE_SIZE,
    slot_pos: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    sliding_window: int | None = None,
    value_norms: torch.Tensor | None = None,
    emit: bool = False,
) -> tuple[torch.Tensor, Emitted | None]:
    """Dense torch decode attention masked to the listed pages (the contract of the kernel).
    Shapes are checked as the kernel checks them (`check_layout`)."""
    check_layout(q, k, v, lengths, slot_pos, query_pos, value_norms, page_table)
    capacity = k.shape[2]
    mask = valid_slot_mask(lengths, capacity, slot_pos, query_pos, sliding_window)
    mask &= page_table_mask(page_table, capacity, page_size)
    return masked_attention_reference(
        q, k, v, mask, scale=scale, value_norms=value_norms, emit=emit
    )


def page_slots(
    page_table: torch.Tensor, capacity: int, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, listed), each (B, H_kv, K * page_size): the slot of every entry of the listed
    pages (clamped into the arena, for gathering) and whether it is a real slot of a listed page
    (page >= 0, inside the arena)."""
    offsets = torch.arange(page_size, device=page_table.device)
    slots = (page_table.long().unsqueeze(-1) * page_size + offsets).flatten(2)
    listed = (slots >= 0) & (slots < capacity)  # page -1 gives negative slots
    return slots.clamp(0, capacity - 1), listed


def sparse_decode_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    page_table: torch.Tensor,
    *,
    scale: float,
    page_size: int = PAGE_SIZE,
    slot_pos: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    sliding_window: int | None = None,
    value_norms: torch.Tensor | None = None,
    emit: bool = False,
) -> tuple[torch.Tensor, Emitted | None]:
    """The reference's contract reading only the listed pages: their K/V (and slot positions,
    value norms) are gathered into (B, H_kv, K * page_size, D) and attended under the mask of
    the valid entries; emitted statistics are scattered back to (B, H_kv, C), 0 where unread."""
    check_layout(q, k, v, lengths, slot_pos, query_pos, value_norms, page_table)
    capacity = k.shape[2]
    if not emit and q.device.type == "cpu":
        out = _listed_in_place(q, k, v, lengths, page_table, scale, page_size, slot_pos,
                               query_pos, sliding_window)  # fmt: skip
        if out is not None:
            return out, None
    slots, listed = page_slots(page_table, capacity, page_size)  # (B, H_kv, E)
    mask = listed & (slots < lengths.unsqueeze(-1))
    if sliding_window is not None:
        if slot_pos is None or query_pos is None:
            raise ValueError("a sliding window needs slot_pos and query_pos")
        mask &= slot_pos.gather(2, slots) > query_pos.view(-1, 1, 1) - sliding_window
    norms = None
    if value_norms is not None:
        group = q.shape[1] // k.shape[1]
        norms = value_norms.gather(2, slots.repeat_interleave(group, dim=1))  # (B, H_q, E)
    rows = _rows(slots, capacity)
    out, emitted = masked_attention_torch(
        q, _gather_rows(k, rows), _gather_rows(v, rows), mask, scale=scale, value_norms=norms,
        emit=emit,
    )  # fmt: skip
    if emitted is None:
        return out, None
    return out, Emitted(
        mass=_scatter_slots(emitted.mass, slots, capacity),
        contribution=None
        if emitted.contribution is None
        else _scatter_slots(emitted.contribution, slots, capacity),
    )


def _listed_in_place(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    page_table: torch.Tensor,
    scale: float,
    page_size: int,
    slot_pos: torch.Tensor | None,
    query_pos: torch.Tensor | None,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """Without emission on a CPU: the C kernel over the whole layer under the listed pages'
    mask, which reads the K/V of the allowed slots only, where they lie (no gather); None where
    the C kernel does not apply."""
    q_kv = q if q.dtype == k.dtype else q.to(k.dtype)
    if not applies(q_kv, k, v, k.shape[1]):
        return None
    mask = valid_slot_mask(lengths, k.shape[2], slot_pos, query_pos, sliding_window)
    mask &= page_table_mask(page_table, k.shape[2], page_size)
    out = cpu_decode_attention(q_kv, k, v, mask, scale)
    if out is None:
        return None
    return out if out.dtype == q.dtype else out.to(q.dtype)


def _rows(slots: torch.Tensor, capacity: int) -> torch.Tensor:
    """Flat row index (B * H_kv * E,) of slots (B, H_kv, E) in a (B * H_kv * C, D) view."""
    heads = torch.arange(slots.shape[0] * slots.shape[1], device=slots.device)
    return (heads.view(*slots.shape[:2], 1) * capacity + slots).flatten()


def _gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, H_kv, C, D) at `_rows` -> (B, H_kv, E, D): one row copy per slot (index_select,
    ~15x faster on CPU than gather's per-element index)."""
    batch, kv_heads, _, head_dim = x.shape
    return x.reshape(-1, head_dim).index_select(0, rows).view(batch, kv_heads, -1, head_dim)


def _scatter_slots(values: torch.Tensor, slots: torch.Tensor, capacity: int) -> torch.Tensor:
    """(B, H_kv, E) per-entry values -> (B, H_kv, C), 0 on slots no entry read. Added, not
    assigned: a masked entry (value 0) may share its clamped slot with a real one."""
    full = values.new_zeros(*values.shape[:2], capacity)
    return full.scatter_add_(2, slots, values)


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    page_table: torch.Tensor,
    *,
    scale: float,
    page_size: int = PAGE_SIZE,
    slot_pos: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    sliding_window: int | None = None,
    value_norms: torch.Tensor | None = None,
    emit: bool = False,
) -> tuple[torch.Tensor, Emitted | None]:
    """Decode attention reading only the pages of ``page_table`` (B, H_kv, K) from ``select_pages``.

    Same arguments and outputs as ``decode_attention``; emitted mass and contribution are 0 on the
    slots that were not read. Triton on CUDA, the gathering torch path elsewhere.
    """
    options = dict(
        scale=scale,
        page_size=page_size,
        slot_pos=slot_pos,
        query_pos=query_pos,
        sliding_window=sliding_window,
        value_norms=value_norms,
        emit=emit,
    )
    if q.is_cuda and triton_available():
        return decode_attention_triton(q, k, v, lengths, page_table=page_table, **options)
    return sparse_decode_attention_torch(q, k, v, lengths, page_table, **options)
