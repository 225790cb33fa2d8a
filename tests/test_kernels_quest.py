"""Quest: page bounds, the upper-bound property, page selection, sparse == dense attention."""

import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are jitted, at first launch

from test_kernels_decode_attention import (  # noqa: E402
    DEVICE,
    GRID,
    KV_HEADS,
    MASS_TOL,
    TOL,
    assert_matches,
    brute_force_decode,
    make_case,
    needs_triton,
    spy_on,
)

from nanokv.kernels.decode_attention import (  # noqa: E402
    decode_attention_reference,
    decode_attention_triton,
    triton_available,
)
from nanokv.kernels.quest import (  # noqa: E402
    merge_page_bounds,
    page_bounds,
    page_upper_bound,
    select_pages,
    sparse_decode_attention,
    sparse_decode_attention_reference,
    sparse_decode_attention_torch,
    update_page_bounds,
)

PS = 16


def brute_force_bounds(k, lengths, page_size):
    """Loop over pages: min / max of the valid keys, (+inf, -inf) for an empty page."""
    batch, kv_heads, capacity, head_dim = k.shape
    pages = -(-capacity // page_size)
    kmin = torch.full((batch, kv_heads, pages, head_dim), float("inf"), dtype=k.dtype)
    kmax = torch.full_like(kmin, float("-inf"))
    for b in range(batch):
        for g in range(kv_heads):
            for p in range(pages):
                keys = k[b, g, p * page_size : min((p + 1) * page_size, int(lengths[b, g]))]
                if len(keys):
                    kmin[b, g, p], kmax[b, g, p] = keys.amin(0), keys.amax(0)
    return kmin, kmax


def test_page_bounds_equal_brute_force():
    k = torch.randn(2, 2, 70, 8)
    lengths = torch.tensor([[70, 1], [32, 0]])
    kmin, kmax = page_bounds(k, lengths, PS)
    assert kmin.shape == (2, 2, 5, 8)
    expected_min, expected_max = brute_force_bounds(k, lengths, PS)
    assert torch.equal(kmin, expected_min) and torch.equal(kmax, expected_max)


def test_update_page_bounds_after_scatter_and_append():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 70, 8, generator=gen)
    lengths = torch.tensor([[60, 1], [32, 45]])
    kmin, kmax = page_bounds(k, lengths, PS)
    # Scatter into freed slots (replacing a key that may have been a page's min or max) and
    # append one token per head at its length.
    slots = torch.tensor([[[3, 17, 60], [0, 5, 1]], [[31, 31, 32], [2, 44, 45]]])
    k.scatter_(2, slots.unsqueeze(-1).expand(-1, -1, -1, 8), torch.randn(2, 2, 3, 8, generator=gen))
    lengths = lengths + 1
    update_page_bounds(kmin, kmax, k, lengths, slots, PS)
    expected_min, expected_max = page_bounds(k, lengths, PS)
    assert torch.equal(kmin, expected_min) and torch.equal(kmax, expected_max)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merged_bounds_after_appends_equal_recomputed_ones(dtype):
    """A decode step's append folded in (fp32 bounds of a bf16 arena too), heads at different
    lengths: one mid-page, one opening a new (empty) page, one opening the arena's last page."""
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(2, 2, 70, 8, generator=gen).to(dtype)
    lengths = torch.tensor([[37, 16], [64, 0]])
    kmin, kmax = (b.float() for b in page_bounds(k, lengths, PS))
    for _ in range(3):  # three steps: every head appends at its length
        slots = lengths.clone()
        k_new = torch.randn(2, 2, 8, generator=gen).to(dtype)
        k[torch.arange(2).unsqueeze(1), torch.arange(2), slots] = k_new
        lengths = lengths + 1
        merge_page_bounds(kmin, kmax, k_new, slots, PS)
        expected_min, expected_max = page_bounds(k, lengths, PS)
        assert torch.equal(kmin, expected_min.float()) and torch.equal(kmax, expected_max.float())


finite = st.floats(-50, 50, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    group=st.sampled_from([1, 3, 4]),
    capacity=st.integers(1, 60),
    head_dim=st.sampled_from([4, 16, 64]),
    seed=st.integers(0, 2**31 - 1),
    key_scale=st.sampled_from([1e-3, 1.0, 30.0]),
    coarse=st.booleans(),
)
def test_page_bound_is_an_upper_bound_of_every_valid_logit(
    group, capacity, head_dim, seed, key_scale, coarse
):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, capacity, head_dim, generator=gen) * key_scale
    q = torch.randn(1, 2 * group, head_dim, generator=gen)
    if coarse:  # many exact ties and zeros: equality cases of the bound
        k, q = k.round(), q.round()
    lengths = torch.randint(1, capacity + 1, (1, 2), generator=gen)
    scale = head_dim**-0.5
    bound = page_upper_bound(q, *page_bounds(k, lengths, PS), scale)  # (1, H_q, P)
    logits = torch.einsum("hd,hcd->hc", q[0].double(), k[0].double().repeat_interleave(group, 0))
    logits = logits * scale  # (H_q, C), exact enough in float64
    # fp32 rounding of the bound, relative to the size of its terms.
    key_size = k[0].abs().amax(1).repeat_interleave(group, 0)  # (H_q, D)
    slack = 1e-5 * scale * (q[0].abs() * key_size).sum(-1)  # (H_q,)
    for h in range(2 * group):
        g = h // group
        for j in range(int(lengths[0, g])):
            assert bound[0, h, j // PS] >= logits[h, j] - slack[h]
        for p in range(-(-int(lengths[0, g]) // PS), bound.shape[2]):
            assert bound[0, h, p] == float("-inf")  # pages past the length are empty


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_page_bound_property_on_arbitrary_floats(data):
    """Hypothesis-chosen key and query values (one kv head, 3 pages) against every valid key."""
    head_dim = data.draw(st.integers(1, 8), label="head_dim")
    values = data.draw(st.lists(finite, min_size=48 * head_dim, max_size=48 * head_dim))
    qs = data.draw(st.lists(finite, min_size=head_dim, max_size=head_dim), label="q")
    length = data.draw(st.integers(1, 48), label="length")
    keys = torch.tensor(values).view(1, 1, 48, head_dim)
    q = torch.tensor(qs).view(1, 1, head_dim)
    bound = page_upper_bound(q, *page_bounds(keys, torch.tensor([[length]]), PS), 1.0)
    logits = keys[0, 0, :length].double() @ q[0, 0].double()
    terms = keys[0, 0, :length].double().abs() @ q[0, 0].double().abs()
    # fp32 rounding relative to the terms, plus products that underflow fp32 (e.g. 1e-26 ** 2)
    slack = 1e-5 * terms.max() + torch.finfo(torch.float32).tiny
    for j in range(length):
        assert bound[0, 0, j // PS] >= logits[j] - slack


def test_select_pages_budget_last_page_ties_and_padding():
    # 2 kv heads of 2 query heads; 5 pages of capacity; lengths 70 (5 pages) and 20 (2 pages).
    bound = torch.tensor(
        [
            [
                [5.0, 1.0, 5.0, 9.0, -3.0],  # kv head 0
                [0.0, 2.0, 4.0, 0.0, -9.0],
                [1.0, 7.0, 0.0, 0.0, 0.0],  # kv head 1
                [1.0, 0.0, 0.0, 0.0, 0.0],
            ]
        ]
    )
    lengths = torch.tensor([[70, 20]])
    table = select_pages(bound, lengths, token_budget=48, page_size=PS)
    assert table.dtype == torch.int32 and table.shape == (1, 2, 3)
    # Head 0, max over its query heads: [5, 2, 5, 9, -3]: last page 4 forced, then 3, then the
    # tie 0 / 2 goes to page 0. Head 1: only 2 valid pages, padded with -1.
    assert table.tolist() == [[[0, 3, 4], [0, 1, -1]]]
    table = select_pages(bound, lengths, token_budget=48, page_size=PS, reduce="mean")
    assert table.tolist() == [[[2, 3, 4], [0, 1, -1]]]  # means [2.5, 1.5, 4.5, 4.5, -6]
    assert select_pages(bound, lengths, token_budget=5, page_size=PS).tolist() == [[[4], [1]]]
    with pytest.raises(ValueError, match="reduce"):
        select_pages(bound, lengths, 48, PS, reduce="median")


def selected_case(group, head_dim, dtype, window, budget=32):
    """A decode case with a Quest page table of ``budget`` tokens (2 pages of 5)."""
    case = make_case(group, head_dim, dtype, window)
    kmin, kmax = page_bounds(case["k"], case["lengths"], PS)
    bound = page_upper_bound(case["q"], kmin, kmax, case["scale"])
    return case, select_pages(bound, case["lengths"], token_budget=budget, page_size=PS)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("window", [None, 40])
def test_full_budget_sparse_reference_equals_dense_exactly(group, window):
    case, table = selected_case(group, 64, torch.float32, window, budget=10_000)
    out, emitted = sparse_decode_attention_reference(**case, page_table=table, emit=True)
    dense_out, dense = decode_attention_reference(**case, emit=True)
    assert torch.equal(out, dense_out)
    assert torch.equal(emitted.mass, dense.mass)
    assert torch.equal(emitted.contribution, dense.contribution)


def listed_pages(table: torch.Tensor) -> set[tuple[int, int, int]]:
    """(sequence, kv head, page) of every page a (B, H_kv, P) page table lists (-1: none)."""
    return {
        (b, g, page)
        for b in range(table.shape[0])
        for g in range(KV_HEADS)
        for page in table[b, g].tolist()
        if page >= 0
    }


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("window", [None, 40])
def test_sparse_reference_equals_brute_force(group, window):
    case, table = selected_case(group, 64, torch.float32, window)
    listed = listed_pages(table)
    expected = brute_force_decode(**case, allowed=lambda b, g, j: (b, g, j // PS) in listed)
    out, emitted = sparse_decode_attention_reference(**case, page_table=table, emit=True)
    assert_matches(out, emitted, *expected, torch.float32)
    unread = emitted.mass == 0
    assert unread.any() and (emitted.contribution[unread] == 0).all()


def _unlisted_poisoned(case: dict, table: torch.Tensor) -> dict:
    """`case` with NaN keys, values and value norms on every slot of an unlisted page: a path
    that reads them returns NaN."""
    listed = listed_pages(table)
    k, v, norms = case["k"].clone(), case["v"].clone(), case["value_norms"].clone()
    group = norms.shape[1] // KV_HEADS
    for b in range(k.shape[0]):
        for g in range(KV_HEADS):
            for page in range(-(-k.shape[2] // PS)):
                if (b, g, page) not in listed:
                    slots = slice(page * PS, (page + 1) * PS)
                    k[b, g, slots] = v[b, g, slots] = float("nan")
                    norms[b, g * group : (g + 1) * group, slots] = float("nan")
    return {**case, "k": k, "v": v, "value_norms": norms}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("window", [None, 40])
def test_gathered_torch_path_equals_masked_dense_reference(group, window, dtype):
    """The CPU path gathers the listed pages and attends over them only: equal to the dense
    reference under the page mask, though every unlisted slot holds NaN (so it was not read)."""
    case, table = selected_case(group, 64, dtype, window)
    ref_out, ref = sparse_decode_attention_reference(**case, page_table=table, emit=True)
    poisoned = _unlisted_poisoned(case, table)
    for emit in (True, False):
        out, emitted = sparse_decode_attention_torch(**poisoned, page_table=table, emit=emit)
        if emit:
            assert_matches(out, emitted, ref_out, ref.mass, ref.contribution, dtype)
        else:
            assert emitted is None
            torch.testing.assert_close(out.float(), ref_out.float(), **TOL[dtype])


def test_gathered_torch_path_takes_any_page_table():
    """Pages in any order, with -1 anywhere, and the arena's last partial page (capacity 70):
    the gathered path still equals the masked reference."""
    case, _ = selected_case(3, 64, torch.float32, 40)
    table = torch.tensor([[[4, -1, 0], [-1, 0, -1]], [[2, -1, 1], [3, 0, 2]]], dtype=torch.int32)
    out, emitted = sparse_decode_attention_torch(**case, page_table=table, emit=True)
    ref_out, ref = sparse_decode_attention_reference(**case, page_table=table, emit=True)
    assert_matches(out, emitted, ref_out, ref.mass, ref.contribution, torch.float32)


@needs_triton
@pytest.mark.parametrize("group, head_dim, dtype, window", GRID)
def test_triton_sparse_equals_reference(group, head_dim, dtype, window):
    case, table = selected_case(group, head_dim, dtype, window)
    out, emitted = decode_attention_triton(
        **case, page_table=table, page_size=PS, emit=True, block_n=16, split_size=32
    )
    ref_out, ref = sparse_decode_attention_reference(**case, page_table=table, emit=True)
    assert_matches(out, emitted, ref_out, ref.mass, ref.contribution, dtype)


@needs_triton
def test_triton_full_budget_sparse_equals_dense():
    case, table = selected_case(3, 64, torch.float32, 40, budget=10_000)
    assert (table >= 0).sum() == 5 + 1 + 3 + 4  # every valid page of every head
    out, emitted = decode_attention_triton(**case, page_table=table, page_size=PS, emit=True)
    dense_out, dense = decode_attention_triton(**case, emit=True)
    torch.testing.assert_close(out, dense_out, **TOL[torch.float32])
    torch.testing.assert_close(emitted.mass, dense.mass, **MASS_TOL)
    torch.testing.assert_close(emitted.contribution, dense.contribution, **MASS_TOL)


def test_dispatcher_equals_brute_force_and_takes_this_devices_path(monkeypatch):
    """The public sparse dispatcher against the naive loops restricted to the listed pages (not
    against either implementation), and the path it took: the paged Triton kernel on CUDA, the
    gathering torch path elsewhere."""
    import nanokv.kernels.quest as quest

    names = ("sparse_decode_attention_torch", "decode_attention_triton")
    calls = spy_on(monkeypatch, quest, names)
    case, table = selected_case(4, 64, torch.float32, None)
    listed = listed_pages(table)
    out, emitted = sparse_decode_attention(**case, page_table=table, emit=True)
    assert out.device.type == DEVICE
    expected = brute_force_decode(**case, allowed=lambda b, g, j: (b, g, j // PS) in listed)
    assert_matches(out, emitted, *expected, torch.float32)
    assert (emitted.mass == 0).any()  # the page table really left slots unread
    on_gpu = DEVICE == "cuda" and triton_available()
    assert calls == ["decode_attention_triton" if on_gpu else "sparse_decode_attention_torch"]


def test_sparse_shape_errors_name_the_tensor():
    """The page table's shape is checked on every path (a ValueError, kept under python -O)."""
    case, table = selected_case(3, 64, torch.float32, None)
    bad = torch.zeros(2, 3, table.shape[2], dtype=torch.int32, device=table.device)
    message = re.escape(f"page_table must have shape (2, 2, *), got (2, 3, {table.shape[2]})")
    for attend in (
        sparse_decode_attention,
        sparse_decode_attention_reference,
        sparse_decode_attention_torch,
    ):
        with pytest.raises(ValueError, match=message):
            attend(**case, page_table=bad)
    with pytest.raises(ValueError, match=message):
        decode_attention_triton(**case, page_table=bad)
