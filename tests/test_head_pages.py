"""Pages per head (`KVArena.pack_heads`, head_pages.py, kernels/packed_attention.py): a layer
whose heads keep different counts holds each head's slots only. Its contents, its edits and its
attention must equal the rectangular layer's; an engine decodes the same tokens with it, in
fewer bytes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import make_hf_model, save_checkpoint

from nanokv import head_pages as head_pages_module
from nanokv.arena import KVArena
from nanokv.budget import Budget
from nanokv.engine import Engine
from nanokv.head_pages import HeadPages, PackedBuffer
from nanokv.kernels import packed_attention as packed_attention_module
from nanokv.kernels.decode_attention import decode_attention_reference
from nanokv.kernels.packed_attention import packed_decode_attention
from nanokv.loader import load_config, load_model
from nanokv.policies import make_policy

LAYERS, KV_HEADS, GROUP, DIM = 2, 3, 2, 4


def test_layout_puts_rows_one_after_another():
    pages = HeadPages.for_slots(torch.tensor([[3, 17, 1], [0, 5, 2]]))
    assert pages.caps.tolist() == [[3, 17, 1], [1, 5, 2]]  # a row holds at least one slot
    assert pages.starts.tolist() == [[0, 3, 20], [21, 22, 27]]
    assert pages.slots == 29 and pages.width == 17
    assert pages.pages == 1 + 2 + 1 + 1 + 1 + 1  # whole 16-slot pages a row
    assert pages.row_of_slot.tolist() == [0] * 3 + [1] * 17 + [2] + [3] + [4] * 5 + [5] * 2


@pytest.mark.parametrize("group", [None, GROUP])
def test_a_packed_buffer_gives_back_each_rows_slots(group):
    gen = torch.Generator().manual_seed(0)
    caps = torch.tensor([[5, 2, 7], [1, 6, 3]])
    pages = HeadPages.for_slots(caps)
    heads = KV_HEADS * group if group else KV_HEADS
    rect = torch.randn(2, heads, 9, *(() if group else (DIM,)), generator=gen)
    packed = PackedBuffer.pack(rect, pages, fill=-1, group=group)
    assert packed.numel() == pages.slots * (group or DIM)
    back = packed.gather()
    assert back.shape == packed.shape == (2, heads, 7, *(() if group else (DIM,)))
    for b in range(2):
        for head in range(heads):
            cap = int(caps[b, head // (group or 1)])
            assert torch.equal(back[b, head, :cap], rect[b, head, :cap])
            assert (back[b, head, cap:] == -1).all()
    back[0, 0, 0] += 1  # an edit of the rectangle, written back
    packed.store(back)
    assert torch.equal(packed.gather(), back)


def _flat_pos(lengths: torch.Tensor, pages: HeadPages, newest: torch.Tensor) -> torch.Tensor:
    """(S,): row (b, h)'s slots hold positions up to newest[b], its last valid slot the newest;
    -1 past its length."""
    slots = torch.arange(pages.width).view(1, 1, -1)
    rect = newest.view(-1, 1, 1) - lengths.unsqueeze(-1) + 1 + slots
    rect[slots.expand_as(rect) >= lengths.unsqueeze(-1)] = -1
    return PackedBuffer.pack(rect.int(), pages, fill=-1).flat


def test_row_bias_is_minus_inf_off_each_heads_row_and_held_only_when_small(monkeypatch):
    pages = HeadPages.for_slots(torch.tensor([[2, 3], [1, 1]]))
    bias = pages.row_bias(GROUP, torch.float32)  # (B * H_q, S): query head -> its kv row
    rows = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]).unsqueeze(1)
    slot_rows = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    want = torch.where(rows == slot_rows, 0.0, float("-inf"))
    assert torch.equal(bias, want) and bias.dtype == torch.float32
    assert pages.row_bias(GROUP, torch.float32) is bias  # held with the layout
    monkeypatch.setattr(head_pages_module, "ROW_BIAS_CACHED", want.numel() - 1)
    assert (
        HeadPages.for_slots(torch.tensor([[2, 3], [1, 1]])).row_bias(GROUP, torch.float32) is None
    )


@pytest.mark.parametrize("sdpa", [True, False], ids=["half-sdpa", "half-converted"])
@pytest.mark.parametrize("held", [True, False], ids=["bias-held", "masked"])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_equals_the_dense_reference(monkeypatch, dtype, window, held, sdpa):
    """Two sequences, GQA 2, heads of very different lengths: the packed layer's attention over
    its flat buffers equals the dense reference over the same rows as a rectangle, twice (the
    second time with the layout's held bias, or under a mask where the bias is too large); in
    bf16 both through SDPA (CUDA's path) and converted to fp32 (every CPU's)."""
    if not held:
        monkeypatch.setattr(head_pages_module, "ROW_BIAS_CACHED", 0)
    monkeypatch.setattr(packed_attention_module, "converts_half", lambda device_type: not sdpa)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([[4, 19, 1], [11, 2, 30]])
    pages = HeadPages.for_slots(lengths + torch.tensor([[2, 0, 5], [0, 3, 1]]))
    k = torch.randn(pages.slots, DIM, generator=gen).to(dtype)
    v = torch.randn(pages.slots, DIM, generator=gen).to(dtype)
    query_pos = torch.tensor([40, 31])
    slot_pos = _flat_pos(lengths, pages, query_pos - 1)
    q = torch.randn(2, KV_HEADS * GROUP, DIM, generator=gen).to(dtype)
    outs = [
        packed_decode_attention(
            q, k, v, slot_pos, pages, scale=0.5, query_pos=query_pos, sliding_window=window
        )
        for _ in range(2)
    ]
    assert torch.equal(outs[0], outs[1]) and outs[0].dtype == dtype
    out = outs[0]
    as_rect = [PackedBuffer(t, pages).gather() for t in (k, v, slot_pos)]
    want, _ = decode_attention_reference(
        q, as_rect[0], as_rect[1], lengths, scale=0.5, slot_pos=as_rect[2], query_pos=query_pos,
        sliding_window=window,
    )  # fmt: skip
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=0)
    torch.testing.assert_close(out.float(), want.float(), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_with_a_window_asks_for_query_positions(dtype):
    pages = HeadPages.for_slots(torch.tensor([[2, 3, 1]]))
    k = torch.zeros(pages.slots, DIM, dtype=dtype)
    q = torch.zeros(1, KV_HEADS * GROUP, DIM, dtype=dtype)
    slot_pos = torch.zeros(pages.slots, dtype=torch.int32)
    with pytest.raises(ValueError, match="a sliding window needs query_pos"):
        packed_decode_attention(q, k, k, slot_pos, pages, scale=0.5, sliding_window=4)


def _arena(batch: int, capacity: int) -> KVArena:
    return KVArena(
        LAYERS, batch, KV_HEADS, capacity, DIM, dtype=torch.float32, q_heads=KV_HEADS * GROUP,
        slot_state=("usage",),
    )  # fmt: skip


def _same_rows(packed: KVArena, stacked: KVArena) -> None:
    """Every valid slot of every head holds the same token, statistics and norms."""
    assert torch.equal(packed.lengths, stacked.lengths)
    for layer in range(LAYERS):
        a, b = packed.layer(layer), stacked.layer(layer)
        for seq in range(a.lengths.shape[0]):
            for head in range(KV_HEADS):
                n = int(a.lengths[seq, head])
                for name in ("k", "v", "pos", "score"):
                    assert torch.equal(
                        getattr(a, name)[seq, head, :n], getattr(b, name)[seq, head, :n]
                    )
                assert torch.equal(a.state["usage"][seq, head, :n], b.state["usage"][seq, head, :n])
                group = slice(head * GROUP, head * GROUP + GROUP)
                assert torch.equal(a.value_norms[seq, group, :n], b.value_norms[seq, group, :n])
                assert (a.pos[seq, head, n:] == -1).all()


@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_a_packed_arena_moves_tokens_as_a_rectangular_one(data):
    """Fill, pack, then appends, multi-step evictions (scatter + set_lengths, the moved tokens'
    value norms rewritten), compactions and statistics writes: a packed arena and its
    rectangular twin agree slot for slot, and each packed head holds exactly the slots it was
    given."""
    batch = data.draw(st.integers(1, 2))
    counts = torch.tensor(data.draw(st.lists(st.integers(1, 12), min_size=LAYERS * batch * KV_HEADS,
                                             max_size=LAYERS * batch * KV_HEADS)))  # fmt: skip
    counts = counts.view(LAYERS, batch, KV_HEADS)
    room = data.draw(st.integers(1, 4))
    packed, stacked = _arena(batch, 16), _arena(batch, 16)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    n = 12
    k = torch.randn(KV_HEADS, n, DIM, generator=gen)
    v = torch.randn(KV_HEADS, n, DIM, generator=gen)
    norms = torch.rand(KV_HEADS * GROUP, n, generator=gen)
    usage = torch.rand(KV_HEADS, n, generator=gen)
    for layer in range(LAYERS):
        for seq in range(batch):
            kept = torch.arange(n).expand(KV_HEADS, n)
            for arena in (packed, stacked):
                arena.fill(layer, seq, k, v, torch.arange(n), kept=kept,
                           counts=counts[layer, seq], value_norms=norms, scores=k[..., 0],
                           state={"usage": usage})  # fmt: skip
    packed.pack_heads(counts + room)
    for layer in range(LAYERS):
        row = counts[layer] + room
        if bool((row != row.flatten()[0]).any()):
            assert torch.equal(packed.pages(layer).caps, row)
    _same_rows(packed, stacked)
    for seq in range(batch):  # the union of every head's positions (a conversation's probe)
        held = list(range(int(counts[:, seq].max())))
        assert packed.held_positions(seq) == stacked.held_positions(seq) == held
    for step in range(room):  # appends up to every head's last slot
        new_k = torch.randn(batch, KV_HEADS, DIM, generator=gen)
        new_norms = torch.rand(batch, KV_HEADS * GROUP, generator=gen)
        for layer in range(LAYERS):
            for arena in (packed, stacked):
                arena.append(layer, new_k, -new_k, torch.full((batch,), n + step), new_norms)
    _same_rows(packed, stacked)
    assert all(packed.room(layer) == 0 for layer in range(LAYERS))
    for layer in range(LAYERS):  # a multi-step eviction of `room` victims a head
        lengths = packed.lengths[layer].long()
        victims = torch.stack([torch.randperm(int(c), generator=gen)[:1] for c in
                               (lengths - room).flatten()]).view(batch, KV_HEADS, 1)  # fmt: skip
        window = lengths.unsqueeze(-1) - 1  # the newest token fills the victim's slot
        rows = {"usage": torch.rand(batch, KV_HEADS, 16, generator=gen)}
        for arena in (packed, stacked):
            arena.scatter(layer, window, victims)
            arena.set_lengths(layer, (lengths - 1).int())
            width = arena.layer_capacity(layer)
            arena.set_slot_state(layer, {"usage": rows["usage"][..., :width]})
        fresh = torch.rand(batch, KV_HEADS * GROUP, 1, generator=gen)  # the moved token's norms
        for arena in (packed, stacked):
            arena.write_value_norms(layer, victims, fresh)
        assert torch.equal(packed.values_at(layer, victims), stacked.values_at(layer, victims))
    _same_rows(packed, stacked)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny(request, tmp_path_factory):
    """Mistral's sliding window is shorter than the prompt: the packed mask must follow it."""
    path = save_checkpoint(make_hf_model(request.param), tmp_path_factory.mktemp(request.param))
    cfg = load_config(path)
    return load_model(path, cfg, torch.float32, torch.device("cpu")), cfg


PROMPTS = [[(13 * i + 7) % 300 + 3 for i in range(120)], [(7 * i + 5) % 290 + 3 for i in range(85)]]


@pytest.mark.parametrize("allocation", ["global", "layer"])
@pytest.mark.parametrize("name", ["laprox", "snapkv", "streaming"])
def test_an_engine_decodes_the_same_with_pages_per_head_in_fewer_bytes(tiny, name, allocation):
    """Two prompts of different lengths (so that even a uniform policy's rows differ): the same
    kept tokens, greedy tokens and (close) logits through 24 steps with several evictions, with
    and without pages per head; the packed arena holds less."""
    model, cfg = tiny
    runs = []
    for head_pages in (True, False):
        policy = make_policy(name, allocation=allocation, decode_window=4, observation_window=8,
                             max_head_share=4.0)  # fmt: skip
        engine = Engine(model, cfg, policy, budget=Budget(0.15), head_pages=head_pages)
        state, logits = engine.start(PROMPTS, 24)
        size, all_logits = state.arena.nbytes, [logits]
        for _ in range(24):
            all_logits.append(engine.step(state, all_logits[-1].argmax(-1)))
        runs.append((state, size, torch.stack(all_logits)))
    (packed, packed_bytes, a), (stacked, stacked_bytes, b) = runs
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert torch.equal(packed.arena.lengths, stacked.arena.lengths)
    layers = range(cfg.num_layers)
    assert all(packed.arena.pages(layer) is not None for layer in layers)
    assert packed_bytes < stacked_bytes
    for layer in layers:
        for seq in range(len(PROMPTS)):
            for head in range(cfg.num_kv_heads):
                n = int(packed.arena.lengths[layer, seq, head])
                want = stacked.arena.pos[layer, seq, head, :n].sort().values
                assert torch.equal(packed.arena.pos[layer, seq, head, :n].sort().values, want)


def test_value_norms_and_values_at_slots_of_a_packed_layer_match_a_rectangular_one():
    """`write_value_norms` and `values_at` on several slots a head, in place in a packed
    layer's flat buffers, agree with the rectangular twin's (query heads in kv-head order)."""
    gen = torch.Generator().manual_seed(3)
    packed, stacked = _arena(1, 16), _arena(1, 16)
    n, counts = 12, torch.tensor([[5, 12, 8], [7, 9, 12]])
    k, v = (
        torch.randn(KV_HEADS, n, DIM, generator=gen),
        torch.randn(KV_HEADS, n, DIM, generator=gen),
    )
    for layer in range(LAYERS):
        held = torch.rand(KV_HEADS * GROUP, n, generator=gen)
        for arena in (packed, stacked):
            arena.fill(layer, 0, k, v, torch.arange(n), kept=torch.arange(n).expand(KV_HEADS, n),
                       counts=counts[layer], value_norms=held, scores=k[..., 0],
                       state={"usage": torch.zeros(KV_HEADS, n)})  # fmt: skip
    packed.pack_heads(counts.unsqueeze(1))
    assert packed.pages(0) is not None
    slots = torch.tensor([[[0, 2, 4], [1, 5, 9], [7, 3, 0]]])  # (B, H_kv, 3)
    norms = torch.rand(1, KV_HEADS * GROUP, 3, generator=gen)
    for arena in (packed, stacked):
        arena.write_value_norms(0, slots, norms)
    assert torch.equal(packed.values_at(0, slots), stacked.values_at(0, slots))
    assert torch.equal(packed.values_at(0, slots), v.unsqueeze(0).gather(
        2, slots.unsqueeze(-1).expand(-1, -1, -1, DIM)))  # fmt: skip
    _same_rows(packed, stacked)
