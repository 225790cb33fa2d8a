"""One query token's attention over a layer of the arena on the CPU, in C (`cpu_attention.c`).

The output half of the decode-attention contract (DESIGN.md; `decode_attention.py`): for each
sequence b and query head h of kv head g's group, softmax(scale * q.k) over the slots j < n that
the mask allows (every one without a mask), times V, in fp32 with one rounding to the cache's
dtype at the end; a head with no allowed slot gets zeros. fp32 and bf16 caches, head sizes
that are a multiple of 16 and up to 32 query heads a kv head; anything else (and a missing C
compiler, `kernels/native.py`) gets None, and the caller runs torch's SDPA.

Why: torch's CPU SDPA is a flash kernel tiled for many query rows; with one it reads the cache
at a few GB/s. The C kernel reads each key and value once per kv head for its whole group,
with no tiling overhead: 1.4-2x faster than SDPA over 512 slots and ~2.2x over 8,128 in a
`/tmp` microbenchmark of the default model's shapes (9 query heads, 3 kv heads, 64 dims, one
thread, Zen 5); `bench/attention_kernels.py` measures it against SDPA (`decode` vs `sdpa`).
Single-threaded: a decode step's attention is small next to its weight GEMVs.
"""

from __future__ import annotations

import ctypes

import torch

from nanokv.kernels import native

KINDS = {torch.float32: 0, torch.bfloat16: 1}
LANES, MAX_VECTORS, MAX_GROUP = 16, 16, 32  # as in cpu_attention.c
_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def _kernel() -> ctypes._CFuncPtr | None:
    lib = native.library("cpu_attention")
    if lib is None:
        return None
    fn = lib.decode_attention
    if fn.argtypes is None:
        fn.restype = _INT
        fn.argtypes = [_PTR, _PTR, _I64, _PTR, _PTR, _I64, _I64, _PTR, _I64, _I64,
                       _INT, _INT, _INT, _INT, _I64, _INT, ctypes.c_float]  # fmt: skip
    return fn


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the C kernel takes these operands: CPU, one dtype it knows, rows of a multiple
    of 16 dims laid out contiguously (k and v may be views narrowed along their slots)."""
    batch, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype
        and q.dtype in KINDS
        and head_dim % LANES == 0
        and head_dim // LANES <= MAX_VECTORS
        and q_heads // kv_heads <= MAX_GROUP
        and k.stride() == v.stride()
        and k.stride(3) == 1
        and k.stride(2) == head_dim
    )


def cpu_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor | None:
    """q (B, H_q, D); k, v (B, H_kv, n, D) in q's dtype; mask None or bool (B, H_kv, n).
    Returns the output (B, H_q, D) in q's dtype, or None where the C kernel does not apply."""
    if not supports(q, k, v):
        return None
    kernel = _kernel()
    if kernel is None:
        return None
    batch, q_heads, head_dim = q.shape
    kv_heads, n_slots = k.shape[1], k.shape[2]
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (batch, kv_heads, n_slots):
            raise ValueError(f"mask must be bool {(batch, kv_heads, n_slots)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")  # fmt: skip
        mask = mask if mask.stride(2) == 1 else mask.contiguous()
    q = q.contiguous()  # a no-op for the step's rows; `out` shares its strides
    out = torch.empty_like(q)
    status = kernel(
        q.data_ptr(), out.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(),
        k.stride(0), k.stride(1),
        None if mask is None else mask.data_ptr(),
        0 if mask is None else mask.stride(0), 0 if mask is None else mask.stride(1),
        batch, kv_heads, q_heads // kv_heads, head_dim, n_slots, KINDS[q.dtype], scale,
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"cpu_attention.c: decode_attention returned {status}")
    return out
