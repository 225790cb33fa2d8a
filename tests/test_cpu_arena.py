"""A decode step's arena write in C (kernels/cpu_arena.py) against the torch writes it replaces,
on rectangular and packed layers, with value norms and every slot statistic."""

from __future__ import annotations

import pytest
import torch

from nanokv.arena import KVArena
from nanokv.kernels import cpu_arena, native

pytestmark = pytest.mark.skipif(native.library("cpu_arena") is None, reason="no C compiler")
LAYERS, BATCH, KV_HEADS, GROUP, DIM, PROMPT = 2, 2, 3, 2, 16, 10


def _filled(dtype: torch.dtype, counts: torch.Tensor, pack: bool) -> KVArena:
    """An arena with a prompt kept to `counts` (L, B, H_kv) tokens a head, packed or not."""
    arena = KVArena(LAYERS, BATCH, KV_HEADS, 16, DIM, dtype=dtype, q_heads=KV_HEADS * GROUP,
                    slot_state=("usage",))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(KV_HEADS, PROMPT, DIM, generator=gen).to(dtype) for _ in range(2))
    norms = torch.rand(KV_HEADS * GROUP, PROMPT, generator=gen)
    usage = torch.rand(KV_HEADS, PROMPT, generator=gen)
    for layer in range(LAYERS):
        for seq in range(BATCH):
            arena.fill(layer, seq, k, v, torch.arange(PROMPT),
                       kept=torch.arange(PROMPT).expand(KV_HEADS, PROMPT),
                       counts=counts[layer, seq], value_norms=norms, scores=k[..., 0].float(),
                       state={"usage": usage})  # fmt: skip
    if pack:
        arena.pack_heads(counts + 3)
    return arena


@pytest.mark.parametrize("pack", [False, True], ids=["rectangle", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_c_write_equals_the_torch_write(monkeypatch, dtype, pack):
    counts = torch.tensor([[[4, 10, 7], [1, 5, 5]], [[6, 6, 6], [2, 9, 3]]])
    with_c, with_torch = _filled(dtype, counts, pack), _filled(dtype, counts, pack)
    gen = torch.Generator().manual_seed(1)
    written = {True: [], False: []}
    for step in range(3):
        new_k = torch.randn(BATCH, KV_HEADS, DIM, generator=gen).to(dtype)
        new_v = new_k.transpose(0, 1).contiguous().transpose(0, 1) * 2  # a strided view
        positions = torch.tensor([PROMPT + step, PROMPT + 5 + step])
        norms = torch.rand(BATCH, KV_HEADS * GROUP, generator=gen)
        for layer in range(LAYERS):
            written[True].append(with_c.append(layer, new_k, new_v, positions, norms))
            with monkeypatch.context() as patch:
                patch.setattr(cpu_arena, "_kernel", lambda: None)
                written[False].append(with_torch.append(layer, new_k, new_v, positions, norms))
    assert all(torch.equal(a, b) for a, b in zip(*written.values(), strict=True))
    for layer in range(LAYERS):
        a, b = with_c._flat_rows(layer), with_torch._flat_rows(layer)  # every buffer, flat
        assert torch.equal(a.lengths, b.lengths) and torch.equal(a.lengths, counts[layer] + 3)
        for name in ("k", "v", "pos", "value_norms"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert all(torch.equal(x, y) for x, y in zip(a.slot_state, b.slot_state, strict=True))


def test_operands_it_does_not_take_are_left_to_torch():
    arena = _filled(torch.float32, torch.full((LAYERS, BATCH, KV_HEADS), 4), pack=False)
    rows = arena._flat_rows(0)
    k = torch.zeros(BATCH, KV_HEADS, DIM)
    assert cpu_arena.append_rows(rows, k.bfloat16(), k.bfloat16(), torch.arange(BATCH)) is None
    assert cpu_arena.append_rows(rows, k, k, torch.arange(BATCH).int()) is None
    assert torch.equal(arena.lengths[0], torch.full((BATCH, KV_HEADS), 4, dtype=torch.int32))
