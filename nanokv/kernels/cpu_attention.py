"""One query token's attention over a layer of the arena on the CPU, in C (`cpu_attention.c`).

The output half of the decode-attention contract (DESIGN.md; `decode_attention.py`): for each
sequence b and query head h of kv head g's group, softmax(scale * q.k) over the slots j < n that
the mask allows (every one without a mask), times V, in fp32 with one rounding to the cache's
dtype at the end; a head with no allowed slot gets zeros. fp32 and bf16 caches, head sizes
that are a multiple of 16 and up to 32 query heads a kv head; anything else (and a missing C
compiler, `kernels/native.py`) gets None, and the caller runs torch's SDPA.

Entry points: `cpu_decode_attention` (a rectangular layer, optionally masked),
`cpu_packed_decode_attention` (a packed layer, `head_pages.py`: each query head reads its own
row), and Quest's step (`cpu_quest_attention`: page scores, the pages chosen, attention over
them; `cpu_merge_page_bounds`: the bounds' update after a write), each one C call a layer in
place of a dozen small torch ops.

Why: torch's CPU SDPA is a flash kernel tiled for many query rows; with one it reads the cache
at a few GB/s. The C kernel reads each key and value once per kv head for its whole group,
with no tiling overhead. Over 30 layers' caches of the default model's shapes (9 query heads,
3 kv heads, 64 dims; one thread; Zen 5 EPYC; `/tmp` microbenchmark), microseconds a layer, C
against SDPA: bf16 25.7 / 52.2 at 512 slots and 355 / 1,216 at 8,128 (2.0x, 3.4x); fp32
33.6 / 66.7 and 556 / 1,131 (2.0x, 2.0x); with two threads SDPA was no faster.
`bench/attention_kernels.py` times it (`decode`) against SDPA (`sdpa`). Single-threaded: a
decode step's attention is small next to its weight GEMVs.
"""

from __future__ import annotations

import ctypes

import torch

from nanokv.kernels import native

KINDS = native.KINDS
LANES, MAX_VECTORS, MAX_GROUP = 16, 16, 32  # as in cpu_attention.c
_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


SIGNATURES = {
    "decode_attention": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR,
                         _INT, _INT, _INT, _INT, _I64, _INT, ctypes.c_float],
    "packed_decode_attention": [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR,
                                _INT, _INT, _INT, _INT, ctypes.c_float],
    "quest_decode_attention": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _INT,
                               _INT, _INT, _INT, _INT, _INT, _INT, ctypes.c_float, _PTR],
    "quest_merge_bounds": [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _INT, _INT, _INT, _INT, _INT],
    "emit_over_steps": [_PTR, _INT, _PTR, _INT, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64,
                        _INT, _INT, _INT, _INT, _INT, ctypes.c_float],
}  # fmt: skip


def _kernel(name: str) -> ctypes._CFuncPtr | None:
    """The C function `name` of cpu_attention.c, typed; None where the library is not built."""
    return native.function("cpu_attention", name, SIGNATURES[name])


def _checked(name: str, status: int) -> None:
    if status != 0:
        raise RuntimeError(f"cpu_attention.c: {name} returned {status}")


def backend() -> str:
    """What a CPU decode step's attention runs on, for `nanokv generate --verbose`."""
    if not native.enabled():
        return "torch SDPA (NANOKV_NATIVE=0)"
    if native.library("cpu_attention") is None:
        return "torch SDPA (the C kernel did not build; see the warning above)"
    return "C kernel built for this CPU (kernels/cpu_attention.c; SDPA where it does not apply)"


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> bool:
    """Whether the C kernel takes these operands: CPU, one dtype it knows, `kv_heads` that
    divide the query heads into groups of at most 32, rows of a multiple of 16 dims laid out
    contiguously (k and v (..., n, D) may be views narrowed along their slots)."""
    q_heads, head_dim = q.shape[1], q.shape[2]
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype
        and q.dtype in KINDS
        and head_dim % LANES == 0
        and head_dim // LANES <= MAX_VECTORS
        and q_heads % kv_heads == 0
        and q_heads // kv_heads <= MAX_GROUP
        and k.stride() == v.stride()
        and k.stride(-1) == 1
        and k.stride(-2) == head_dim
    )


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> bool:
    """`supports` and the C library built: a caller checks this before making a mask for it."""
    return supports(q, k, v, kv_heads) and native.library("cpu_attention") is not None


def cpu_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """q (B, H_q, D); k, v (B, H_kv, n, D) in q's dtype; mask None or bool (B, H_kv, n);
    lengths None or int32 (B, H_kv): each head attends its slots below its length only (the
    arena's lengths: no mask to build, and nothing past a head's length is read).
    Returns the output (B, H_q, D) in q's dtype, or None where the C kernel does not apply."""
    if not supports(q, k, v, k.shape[1]):
        return None
    kernel = _kernel("decode_attention")
    if kernel is None:
        return None
    batch, q_heads, head_dim = q.shape
    kv_heads, n_slots = k.shape[1], k.shape[2]
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (batch, kv_heads, n_slots):
            raise ValueError(f"mask must be bool {(batch, kv_heads, n_slots)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")  # fmt: skip
        mask = mask if mask.stride(2) == 1 else mask.contiguous()
    if lengths is not None:
        if lengths.dtype != torch.int32 or lengths.shape != (batch, kv_heads):
            raise ValueError(f"lengths must be int32 {(batch, kv_heads)}, got {lengths.dtype} "
                             f"{tuple(lengths.shape)}")  # fmt: skip
        lengths = lengths.contiguous()
    q = q.contiguous()  # a no-op for the step's rows; `out` shares its strides
    out = torch.empty_like(q)
    status = kernel(
        q.data_ptr(), out.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
        None if mask is None else mask.data_ptr(),
        0 if mask is None else mask.stride(0), 0 if mask is None else mask.stride(1),
        None if lengths is None else lengths.data_ptr(),
        batch, kv_heads, q_heads // kv_heads, head_dim, n_slots, KINDS[q.dtype], scale,
    )  # fmt: skip
    _checked("decode_attention", status)
    return out


def cpu_packed_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    starts: torch.Tensor,
    slots: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor | None:
    """A packed layer (`head_pages.py`): q (B, H_q, D); k, v (S, D) flat buffers where the row
    of (b, h) is the run starts[b, h] .. starts[b, h] + slots[b, h] - 1 (int64 (B, H_kv));
    mask None or bool (S,), the slots that hold an attended token. Each query head reads its
    own row only. Returns (B, H_q, D) in q's dtype, or None where the C kernel does not apply."""
    rows = starts.numel()
    if not supports(q, k, v, starts.shape[1]):
        return None
    kernel = _kernel("packed_decode_attention")
    if kernel is None:
        return None
    if mask is not None and (mask.dtype != torch.bool or mask.shape != k.shape[:1]):
        raise ValueError(f"mask must be bool ({k.shape[0]},), got {mask.dtype} {tuple(mask.shape)}")
    starts, slots = starts.contiguous(), slots.contiguous()
    mask = None if mask is None else mask.contiguous()
    q = q.contiguous()
    out = torch.empty_like(q)
    status = kernel(
        q.data_ptr(), out.data_ptr(), k.data_ptr(), v.data_ptr(), starts.data_ptr(),
        slots.data_ptr(), None if mask is None else mask.data_ptr(), rows,
        q.shape[1] // starts.shape[1], q.shape[2], KINDS[q.dtype], scale,
    )  # fmt: skip
    _checked("packed_decode_attention", status)
    return out


def cpu_quest_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor],
    keep: int,
    page_size: int,
    scale: float,
    counts: torch.Tensor,
) -> torch.Tensor | None:
    """Quest's whole decode step for a rectangular layer, without emission or a sliding window:
    page scores from `bounds` (kmin, kmax fp32 (B, H_kv, P, D)), the `keep` best pages of each
    kv head (the one being written always; `select_pages`' choice, up to the fp32 rounding of
    the bounds), and attention over their valid slots only. q (B, H_q, D); k, v (B, H_kv, C, D);
    lengths (B, H_kv). Adds the pages read and held to `counts` (int64 (2,), CPU). Returns
    (B, H_q, D) in q's dtype, or None where the C kernel does not apply."""
    kmin, kmax = bounds
    if not (applies(q, k, v, k.shape[1]) and kmin.dtype == kmax.dtype == torch.float32):
        return None
    kernel = _kernel("quest_decode_attention")
    if counts.dtype != torch.int64 or counts.device.type != "cpu" or counts.numel() != 2:
        raise ValueError("counts must be a CPU int64 tensor of 2")
    kmin, kmax = kmin.contiguous(), kmax.contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    q = q.contiguous()
    out = torch.empty_like(q)
    batch, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    status = kernel(
        q.data_ptr(), out.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
        lengths.data_ptr(), kmin.data_ptr(), kmax.data_ptr(), kmin.shape[2], page_size, keep,
        batch, kv_heads, q_heads // kv_heads, head_dim, KINDS[q.dtype], scale,
        counts.data_ptr(),
    )  # fmt: skip
    _checked("quest_decode_attention", status)
    return out


def cpu_merge_page_bounds(
    k: torch.Tensor,
    slots: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor],
    page_size: int,
) -> bool:
    """`merge_page_bounds` of the keys just appended at `slots` (B, H_kv), read from the arena's
    k (B, H_kv, C, D) where they lie, into `bounds` (kmin, kmax fp32 (B, H_kv, P, D)
    contiguous), in one C call. False (nothing done) where the C kernel does not apply."""
    kmin, kmax = bounds
    usable = (
        k.device.type == "cpu"
        and k.dtype in KINDS
        and k.shape[-1] % LANES == 0
        and k.stride(-1) == 1
        and k.stride(-2) == k.shape[-1]
        and kmin.dtype == kmax.dtype == torch.float32
        and kmin.is_contiguous()
        and kmax.is_contiguous()
        and native.library("cpu_attention") is not None
    )
    if not usable:
        return False
    slots = slots.to(torch.int64).contiguous()
    batch, kv_heads, pages, head_dim = kmin.shape
    status = _kernel("quest_merge_bounds")(
        k.data_ptr(), k.stride(0), k.stride(1), slots.data_ptr(), kmin.data_ptr(),
        kmax.data_ptr(), pages, page_size, batch, kv_heads, head_dim, KINDS[k.dtype],
    )  # fmt: skip
    _checked("quest_merge_bounds", status)
    return True


def cpu_emit_over_steps(
    q: torch.Tensor,
    k: torch.Tensor,
    k_base: torch.Tensor,
    lengths: torch.Tensor,
    capacity: int,
    scale: float,
    norms: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The deferred statistics of n decode steps, summed over the steps and each kv head's
    group (`emitted_over_steps(..., summed=True)` without a sliding window), reading the keys
    where they lie. q (B, n, H_q, D); k any tensor of the cache's dtype holding row r = b * H_kv
    + h's slot j at element k_base[r] + j * D (k_base int64 (B, H_kv): a rectangle's row
    offsets or a packed layer's `starts * D`); lengths (B, n, H_kv) the slots step t saw; norms
    None or (values fp32, base int64 (B, H_q), stride): query head (b, h * G + g)'s value norm
    of slot j at values[base[b, h * G + g] + j * stride]. Returns (mass, contribution or None),
    fp32 (B, H_kv, capacity), or None where the C kernel does not apply."""
    batch, steps, q_heads, head_dim = q.shape
    kv_heads = k_base.shape[1]
    kernel = _kernel("emit_over_steps")
    fits = (
        q.dtype in KINDS and k.dtype in KINDS and k.device.type == "cpu"
        and head_dim % LANES == 0 and head_dim // LANES <= MAX_VECTORS
        and q_heads % kv_heads == 0 and q_heads // kv_heads <= MAX_GROUP
        and k.stride(-1) == 1 and k.shape[-1] == head_dim
        and (k.dim() == 2 or k.stride(-2) == head_dim)
    )  # fmt: skip
    if kernel is None or not fits:
        return None
    q, k_base = q.contiguous(), k_base.contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    mass = torch.zeros(batch, kv_heads, capacity)
    contribution = None if norms is None else torch.zeros(batch, kv_heads, capacity)
    values, base, stride = (None, None, 0) if norms is None else norms
    status = kernel(
        q.data_ptr(), KINDS[q.dtype], k.data_ptr(), KINDS[k.dtype], k_base.data_ptr(),
        lengths.data_ptr(), None if values is None else values.data_ptr(),
        None if base is None else base.contiguous().data_ptr(), stride,
        mass.data_ptr(), None if contribution is None else contribution.data_ptr(), capacity,
        batch, steps, kv_heads, q_heads // kv_heads, head_dim, scale,
    )  # fmt: skip
    _checked("emit_over_steps", status)
    return mass, contribution
