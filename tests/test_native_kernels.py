"""The C decode-attention kernel (kernels/cpu_attention.c) against a float64 brute force, its
fallbacks, and the build that makes it (kernels/native.py)."""

from __future__ import annotations

import math

import pytest
import torch

from nanokv.head_pages import HeadPages, PackedBuffer
from nanokv.kernels import native
from nanokv.kernels import packed_attention as packed_attention_module
from nanokv.kernels.cpu_attention import (
    cpu_decode_attention,
    cpu_merge_page_bounds,
    cpu_quest_attention,
    supports,
)
from nanokv.kernels.decode_attention import decode_attention_reference, masked_attention_torch
from nanokv.kernels.packed_attention import packed_decode_attention
from nanokv.kernels.quest import (
    merge_page_bounds,
    page_bounds,
    page_upper_bound,
    select_pages,
    sparse_decode_attention_reference,
)

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


def brute_force(q, k, v, mask, scale):
    """float64 softmax(scale q.k) v per (sequence, query head) over the allowed slots; zeros
    where a head allows none."""
    q, k, v = q.double(), k.double(), v.double()
    batch, q_heads, head_dim = q.shape
    group = q_heads // k.shape[1]
    out = torch.zeros(batch, q_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            g = h // group
            slots = [j for j in range(k.shape[2]) if mask is None or bool(mask[b, g, j])]
            if not slots:
                continue
            logits = torch.stack([scale * (q[b, h] @ k[b, g, j]) for j in slots])
            weights = torch.softmax(logits, 0)
            out[b, h] = sum(w * v[b, g, j] for w, j in zip(weights, slots, strict=True))
    return out


def make(batch, kv_heads, group, slots, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen).to(dtype)
    k = (torch.randn(batch, kv_heads, slots, head_dim, generator=gen) * 2).to(dtype)
    v = torch.randn(batch, kv_heads, slots, head_dim, generator=gen).to(dtype)
    return q, k, v


TOL = {torch.float32: dict(atol=2e-6, rtol=2e-5), torch.bfloat16: dict(atol=8e-3, rtol=8e-3)}
GRID = [
    pytest.param(group, head_dim, dtype, masked, id=f"G{group}-D{head_dim}-{name}-mask{masked}")
    for group in (1, 3, 9)
    for head_dim in (16, 48, 64, 128, 256)
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    for masked in (False, True)
]


@needs_compiler
@pytest.mark.parametrize("group, head_dim, dtype, masked", GRID)
def test_kernel_equals_brute_force(group, head_dim, dtype, masked):
    q, k, v = make(2, 3, group, 41, head_dim, dtype)
    mask = torch.rand(2, 3, 41, generator=torch.Generator().manual_seed(1)) < 0.6
    mask = mask if masked else None
    scale = 1 / math.sqrt(head_dim)
    out = cpu_decode_attention(q, k, v, mask, scale)
    assert out is not None and out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), brute_force(q, k, v, mask, scale), **TOL[dtype])


@needs_compiler
def test_bf16_output_is_the_fp32_result_rounded_once():
    """bf16 in, fp32 inside: the output is the fp32 kernel's on the same (bf16-exact) inputs,
    rounded to bf16 once (round to nearest even)."""
    q, k, v = make(1, 3, 3, 300, 64, torch.bfloat16, seed=3)
    wide = cpu_decode_attention(q.float(), k.float(), v.float(), None, 0.125)
    narrow = cpu_decode_attention(q, k, v, None, 0.125)
    torch.testing.assert_close(narrow, wide.to(torch.bfloat16), atol=0, rtol=2**-8)
    assert (narrow == wide.to(torch.bfloat16)).float().mean() > 0.99


@needs_compiler
def test_views_narrowed_along_slots_and_strided_masks():
    """The arena hands over k and v narrowed to the longest head (strides of the capacity) and
    masks that may be broadcast views; the kernel reads them where they lie."""
    q, k, v = make(2, 2, 4, 90, 64, torch.float32, seed=4)
    narrow_k, narrow_v = k.narrow(2, 0, 57), v.narrow(2, 0, 57)
    lengths = torch.tensor([[57, 20], [3, 57]])
    mask = torch.arange(57).view(1, 1, -1) < lengths.unsqueeze(-1)
    broadcast = (torch.arange(57) % 3 != 1).view(1, 1, -1).expand(2, 2, 57)
    for m in (None, mask, broadcast):
        out = cpu_decode_attention(q, narrow_k, narrow_v, m, 0.125)
        expected = brute_force(q, k[:, :, :57], v[:, :, :57], m, 0.125)
        torch.testing.assert_close(out.double(), expected, **TOL[torch.float32])


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lengths_give_the_bits_of_the_masked_rectangle(dtype):
    """The arena's lengths (each head its own, one of them 0, one past the capacity) read each
    head's slots below its length: the bits of the mask over the longest head's rectangle, and
    the brute force; what lies past a length (here NaN) is never read."""
    q, k, v = make(2, 3, 3, 40, 32, dtype, seed=6)
    lengths = torch.tensor([[40, 7, 0], [23, 99, 1]], dtype=torch.int32)
    clipped = lengths.clamp(max=40)
    mask = torch.arange(40).view(1, 1, -1) < clipped.unsqueeze(-1)
    k_poisoned, v_poisoned = k.masked_fill(~mask[..., None], float("nan")), v.clone()
    v_poisoned[~mask] = float("nan")
    out = cpu_decode_attention(q, k_poisoned, v_poisoned, None, 0.2, lengths=lengths)
    assert torch.equal(out, cpu_decode_attention(q, k, v, mask, 0.2))
    torch.testing.assert_close(out.double(), brute_force(q, k, v, mask, 0.2), **TOL[dtype])


def test_wrong_lengths_are_refused():
    q, k, v = make(1, 2, 1, 10, 16, torch.float32)
    if native.library("cpu_attention") is None:
        pytest.skip("no C kernel here")
    with pytest.raises(ValueError, match="lengths must be int32"):
        cpu_decode_attention(q, k, v, None, 0.1, lengths=torch.ones(1, 2, dtype=torch.int64))


@needs_compiler
def test_a_head_with_nothing_allowed_gets_zeros_and_others_are_unaffected():
    q, k, v = make(1, 2, 3, 20, 32, torch.float32)
    mask = torch.ones(1, 2, 20, dtype=torch.bool)
    mask[0, 1] = False
    out = cpu_decode_attention(q, k, v, mask, 0.2)
    assert torch.equal(out[0, 3:], torch.zeros(3, 32))
    torch.testing.assert_close(out.double(), brute_force(q, k, v, mask, 0.2), **TOL[torch.float32])


@needs_compiler
def test_large_logits_and_long_rows_stay_exact():
    """Logits spread over hundreds (the exponent's range reduction) and 5,000 slots."""
    q, k, v = make(1, 1, 2, 5000, 64, torch.float32, seed=5)
    out = cpu_decode_attention(q * 30, k, v, None, 0.125)
    expected = brute_force(q * 30, k, v, None, 0.125)
    torch.testing.assert_close(out.double(), expected, **TOL[torch.float32])


@pytest.mark.parametrize(
    "change",
    ["fp16", "head_dim_24", "group_33", "k_rows_strided", "mixed_dtypes"],
)
def test_unsupported_operands_fall_back_to_sdpa(change):
    """What the C kernel does not take gets None, and masked_attention_torch still gives the
    reference's result (SDPA's; mixed dtypes: q rounded to the cache's bf16 first)."""
    dtype, head_dim, group = torch.float32, 64, 3
    dtype = torch.float16 if change == "fp16" else dtype
    head_dim = 24 if change == "head_dim_24" else head_dim
    group = 33 if change == "group_33" else group
    q, k, v = make(1, 1, group, 30, head_dim, dtype)
    if change == "k_rows_strided":
        k, v = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (k, v))
    if change == "mixed_dtypes":
        k, v = k.bfloat16(), v.bfloat16()
    assert not supports(q, k, v, k.shape[1])
    assert cpu_decode_attention(q, k, v, None, 0.125) is None
    out, _ = masked_attention_torch(q, k, v, None, scale=0.125)
    lengths = torch.full((1, 1), 30, dtype=torch.int32)
    expected, _ = decode_attention_reference(q, k.to(q.dtype), v.to(q.dtype), lengths, scale=0.125)
    tol = 2e-2 if change == "mixed_dtypes" else 2e-3
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


def test_a_wrong_mask_is_refused():
    q, k, v = make(1, 2, 1, 10, 16, torch.float32)
    if native.library("cpu_attention") is None:
        pytest.skip("no C kernel here")
    with pytest.raises(ValueError, match="mask must be bool"):
        cpu_decode_attention(q, k, v, torch.ones(1, 2, 9, dtype=torch.bool), 0.1)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """`native.library` rebuilt from nothing into tmp_path, for this test only."""
    monkeypatch.setenv("NANOKV_NATIVE_CACHE", str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


@needs_compiler
def test_build_is_cached_by_source_and_machine(fresh_library):
    cc = native.compiler()
    first = native.build("cpu_attention", cc, fresh_library)
    assert first.exists() and native.build("cpu_attention", cc, fresh_library) == first
    assert [p.name for p in fresh_library.iterdir()] == [first.name]  # no temporary left
    lib = native.library("cpu_attention")
    assert lib is not None and hasattr(lib, "decode_attention")


def test_a_failing_compiler_leaves_nothing_and_falls_back(fresh_library, monkeypatch, capsys):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(native.NativeBuildError, match="false failed on cpu_attention.c"):
        native.build("cpu_attention", "false", fresh_library)
    assert list(fresh_library.iterdir()) == []
    assert native.library("cpu_attention") is None
    assert "using the torch path instead" in capsys.readouterr().err
    q, k, v = make(1, 1, 2, 12, 64, torch.float32)
    assert cpu_decode_attention(q, k, v, None, 0.125) is None
    out, _ = masked_attention_torch(q, k, v, None, scale=0.125)  # SDPA answers
    torch.testing.assert_close(out.double(), brute_force(q, k, v, None, 0.125), atol=1e-5, rtol=0)


def test_native_off_by_environment(fresh_library, monkeypatch):
    monkeypatch.setenv("NANOKV_NATIVE", "0")
    assert native.library("cpu_attention") is None
    assert list(fresh_library.iterdir()) == []  # nothing was built


@needs_compiler
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_layer_reads_each_heads_own_row(monkeypatch, dtype, window):
    """A packed layer (rows of very different lengths one after another, empty slots -1, two
    sequences, GQA 3): the C kernel answers (spied) and equals the dense reference over the
    same rows gathered into a rectangle."""
    calls = []
    real = packed_attention_module.cpu_packed_decode_attention
    monkeypatch.setattr(
        packed_attention_module,
        "cpu_packed_decode_attention",
        lambda *args: calls.append(1) or real(*args),
    )
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([[4, 19, 1], [11, 2, 30]])
    pages = HeadPages.for_slots(lengths + torch.tensor([[2, 0, 5], [0, 3, 1]]))
    k = torch.randn(pages.slots, 64, generator=gen).to(dtype)
    v = torch.randn(pages.slots, 64, generator=gen).to(dtype)
    query_pos = torch.tensor([40, 31])
    column = torch.arange(pages.width).view(1, 1, -1)
    rect_pos = query_pos.view(-1, 1, 1) - lengths.unsqueeze(-1) + column  # newest at query - 1
    rect_pos[column.expand_as(rect_pos) >= lengths.unsqueeze(-1)] = -1
    slot_pos = PackedBuffer.pack(rect_pos.int(), pages, fill=-1).flat
    q = torch.randn(2, 9, 64, generator=gen).to(dtype)
    out = packed_decode_attention(
        q, k, v, slot_pos, pages, scale=0.125, query_pos=query_pos, sliding_window=window
    )
    assert calls and out.dtype == dtype
    rect = [PackedBuffer(t, pages).gather() for t in (k, v, slot_pos)]
    want, _ = decode_attention_reference(
        q, rect[0], rect[1], lengths, scale=0.125, slot_pos=rect[2], query_pos=query_pos,
        sliding_window=window,
    )  # fmt: skip
    torch.testing.assert_close(out.double(), want.double(), **TOL[dtype])


def test_verbose_generate_names_the_attention_kernel(tiny_llama_dir, fresh_library, capsys):
    """`nanokv generate --verbose` says whether the C kernel runs, and why not where it does
    not; the answer is the same text either way (greedy, fp32)."""
    from nanokv.cli import main

    argv = ["generate", "--model", str(tiny_llama_dir), "--max-new-tokens", "4", "--verbose"]
    argv += ["--dtype", "float32", "--raw", "hello"]
    assert main(argv) == 0
    on = capsys.readouterr()
    if native.compiler() is not None:
        assert "decode attention: C kernel built for this CPU" in on.err
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOKV_NATIVE", "0")
        native.library.cache_clear()
        assert main(argv) == 0
        off = capsys.readouterr()
    assert "decode attention: torch SDPA (NANOKV_NATIVE=0)" in off.err.splitlines()
    assert off.out == on.out


def test_verbose_generate_names_the_weights_the_projections_read(
    tiny_llama_dir, fresh_library, capsys
):
    """In bf16 on a CPU with bf16 instructions the projections read the C kernel's blocks, and
    oneDNN's packing with the kernels off."""
    from nanokv.cli import main
    from nanokv.models.linear import onednn_does_bf16, packing_for

    if packing_for(torch.bfloat16, torch.device("cpu")) is None:
        pytest.skip("no packed bf16 weights on this CPU")
    argv = ["generate", "--model", str(tiny_llama_dir), "--max-new-tokens", "2", "--verbose"]
    argv += ["--dtype", "bfloat16", "--raw", "hello"]
    assert main(argv) == 0
    if native.compiler() is not None:
        assert "weights: c-blocked" in capsys.readouterr().err.splitlines()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOKV_NATIVE", "0")
        native.library.cache_clear()
        assert main(argv) == 0
    off = "onednn-packed" if onednn_does_bf16() else "output-major"
    assert f"weights: {off}" in capsys.readouterr().err.splitlines()


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("budget", [16, 48, 1000])
def test_quest_step_in_c_equals_select_pages_then_the_masked_reference(dtype, group, budget):
    """Page scores, the choice of pages (the one being written always, the budget's count,
    none past a head's length) and the attention over them: the torch pipeline's table and
    output, on ragged lengths of a 100-slot arena (7 pages, the last one partial); the pages
    read and held are counted."""
    q, k, v = make(2, 2, group, 100, 64, dtype, seed=7)
    lengths = torch.tensor([[100, 1], [37, 64]])
    kmin, kmax = (b.float() for b in page_bounds(k, lengths))
    scale = 0.125
    table = select_pages(page_upper_bound(q, kmin, kmax, scale), lengths, budget)
    want, _ = sparse_decode_attention_reference(q, k, v, lengths, table, scale=scale)
    counts = torch.zeros(2, dtype=torch.int64)
    keep = max(1, min(budget // 16, kmin.shape[2]))
    out = cpu_quest_attention(q, k, v, lengths, (kmin, kmax), keep, 16, scale, counts)
    torch.testing.assert_close(out.double(), want.double(), **TOL[dtype])
    held = (lengths + 15) // 16
    assert counts.tolist() == [int((table >= 0).sum()), int(held.sum())]


@needs_compiler
def test_quest_step_reads_only_the_chosen_pages():
    """NaN in every slot of the pages not chosen: the output is still the reference's."""
    q, k, v = make(1, 2, 3, 160, 64, torch.float32, seed=8)
    lengths = torch.tensor([[160, 150]])
    kmin, kmax = page_bounds(k, lengths)
    table = select_pages(page_upper_bound(q, kmin, kmax, 0.125), lengths, 48)
    want, _ = sparse_decode_attention_reference(q, k, v, lengths, table, scale=0.125)
    chosen = torch.zeros(1, 2, 10, dtype=torch.bool)
    chosen.scatter_(2, table.long().clamp(min=0), table >= 0)
    poisoned = chosen.repeat_interleave(16, dim=2).unsqueeze(-1)
    k, v = (x.masked_fill(~poisoned, float("nan")) for x in (k, v))
    counts = torch.zeros(2, dtype=torch.int64)
    out = cpu_quest_attention(q, k, v, lengths, (kmin, kmax), 3, 16, 0.125, counts)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-5)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merging_an_appended_key_into_its_page_equals_merge_page_bounds(dtype):
    """Into a page that held keys, and into an empty page (+inf, -inf): the torch function's
    bounds, bit for bit."""
    _, k, _ = make(2, 3, 1, 48, 32, dtype, seed=9)
    lengths = torch.tensor([[20, 33, 47], [16, 1, 40]])
    kmin, kmax = (b.float() for b in page_bounds(k, lengths))
    slots = lengths  # the next slot of each head: page 1 and 2 partly full, page 1 of [1, 0] empty
    lengths = lengths + 1
    want_min, want_max = kmin.clone(), kmax.clone()
    new = k[torch.arange(2).unsqueeze(1), torch.arange(3), slots]
    merge_page_bounds(want_min, want_max, new, slots)
    assert cpu_merge_page_bounds(k, slots, (kmin, kmax), 16)
    assert torch.equal(kmin, want_min) and torch.equal(kmax, want_max)
    fresh_min, fresh_max = page_bounds(k, lengths)
    assert torch.equal(kmin, fresh_min.float()) and torch.equal(kmax, fresh_max.float())


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("packed", [False, True], ids=["rectangle", "packed"])
def test_deferred_emission_in_c_equals_emitted_over_steps(dtype, group, packed):
    """The summed statistics of 5 steps (each head and step its own length), read where the
    layer lies, against the torch ops over the rectangle; nothing past a row's last length."""
    from nanokv.arena import KVArena
    from nanokv.kernels.cpu_attention import cpu_emit_over_steps
    from nanokv.kernels.decode_attention import emitted_over_steps

    batch, kv_heads, head_dim, steps = 2, 3, 32, 5
    arena = KVArena(1, batch, kv_heads, 24, head_dim, dtype=dtype, q_heads=kv_heads * group)
    gen = torch.Generator().manual_seed(7)
    counts = torch.tensor([[9, 14, 5], [6, 17, 7]])
    for seq in range(batch):
        k, v = (torch.randn(kv_heads, 17, head_dim, generator=gen).to(dtype) for _ in range(2))
        norms = torch.rand(kv_heads * group, 17, generator=gen)
        arena.fill(0, seq, k, v, torch.arange(17), kept=torch.arange(17).expand(kv_heads, 17),
                   counts=counts[seq], value_norms=norms)  # fmt: skip
    if packed:
        arena.pack_heads(counts.unsqueeze(0) + 2)
    lengths = counts.unsqueeze(1) - torch.arange(steps - 1, -1, -1).view(1, -1, 1)  # (B, n, H)
    q = torch.randn(batch, steps, kv_heads * group, head_dim, generator=gen).to(dtype)
    view, rows = arena.layer(0), arena.row_offsets(0)
    expected = emitted_over_steps(q, view.k, lengths, scale=0.3, value_norms=view.value_norms)
    norms = (rows.norms, rows.norm_base, rows.norm_stride)
    mass, contribution = cpu_emit_over_steps(
        q, rows.keys, rows.key_base, lengths, rows.width, 0.3, norms
    )
    seen = lengths.amax(1).unsqueeze(-1) > torch.arange(rows.width)  # (B, H, C)
    torch.testing.assert_close(mass[seen], expected.mass[seen], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        contribution[seen], expected.contribution[seen], atol=1e-5, rtol=1e-5
    )
    assert (mass[~seen] == 0).all() and (contribution[~seen] == 0).all()
    no_norms = cpu_emit_over_steps(q, rows.keys, rows.key_base, lengths, rows.width, 0.3)
    assert torch.equal(no_norms[0], mass) and no_norms[1] is None
