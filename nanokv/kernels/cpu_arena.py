"""A decode step's write into one layer of the KV arena in one C call (cpu_arena.c).

Why: writing one token per (sequence, kv head) row is ten torch dispatches a layer (index copies
of the key, value and position, the statistics' reset, the lengths' increment, the indices they
need): ~12 us a layer on a 2-core AMD EPYC, thirty layers a step, about what the attention over
512 cached tokens costs. The C function does the same writes in ~3 us (`/tmp` timing).

Contract (`append_rows`): the same effect as `KVArena.append`'s torch path on its flat rows
(`arena._FlatRows`) without value norms: row r = b * H_kv + h gets k[b, h], v[b, h] and
positions[b] at slot lengths[r] (flat slot starts[r] + lengths[r]), 0 in every slot statistic,
and lengths[r] + 1; returns the slots written (B, H_kv) int64, or None where it does not apply
(no library, not on the CPU, operands in another dtype or layout): the caller writes with torch.
"""

from __future__ import annotations

import ctypes

import torch

from nanokv.kernels import native

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
SIGNATURE = [_PTR, _PTR, _PTR, _PTR, _INT, _PTR, _PTR, _INT, _INT, _PTR, _PTR, _I64, _PTR, _PTR]


def _kernel() -> ctypes._CFuncPtr | None:
    return native.function("cpu_arena", "append_rows", SIGNATURE)


def _applies(rows: object, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> bool:
    """CPU operands in the buffers' dtype, positions as the C reads them. The rest is the
    arena's layout by construction (`KVArena`: int32 positions and lengths, int64 row starts,
    float32 statistics, contiguous buffers), which the torch path relies on too."""
    return (
        k.device.type == "cpu"
        and k.dtype == v.dtype == rows.k.dtype
        and positions.dtype == torch.int64
    )


def append_rows(
    rows: object, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor | None:
    """k, v (B, H_kv, D) into `rows` (an arena layer's `_FlatRows`); positions (B,). Returns the
    slots written (B, H_kv) int64, or None where the C function does not apply (see above)."""
    kernel = _kernel()
    if kernel is None or not _applies(rows, k, v, positions):
        return None
    batch, kv_heads, head_dim = k.shape
    states = rows.slot_state
    state_pointers = (ctypes.c_void_p * max(len(states), 1))(*(s.data_ptr() for s in states))
    k, v, starts, positions = (t.contiguous() for t in (k, v, rows.starts, positions))
    slots = torch.empty(batch, kv_heads, dtype=torch.int64)
    status = kernel(
        rows.k.data_ptr(), rows.v.data_ptr(), rows.pos.data_ptr(), state_pointers, len(states),
        starts.data_ptr(), rows.lengths.data_ptr(), batch * kv_heads, kv_heads,
        k.data_ptr(), v.data_ptr(), head_dim * k.element_size(), positions.data_ptr(),
        slots.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"cpu_arena.c: append_rows returned {status}")
    return slots
