"""Prefill scoring: dense formulas == chunked torch == Triton (interpreter); no n x n tensor."""

import math
import os
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are jitted, at first launch

from test_kernels_decode_attention import spy_on  # noqa: E402

from nanokv.kernels.decode_attention import triton_available  # noqa: E402
from nanokv.kernels.prefill_scores import (  # noqa: E402
    column_statistics,
    column_statistics_torch,
    column_statistics_triton,
    visible_counts,
    window_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")


def make_prompt(q_heads, kv_heads, n, head_dim, dtype=torch.float32, seed=0, offset=3):
    """Random post-RoPE q / k of one prompt; positions start at ``offset`` (a chunked prefill)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(q_heads, n, head_dim, generator=gen).to(dtype)
    k = torch.randn(kv_heads, n, head_dim, generator=gen).to(dtype)
    return q, k, torch.arange(n) + offset


def dense_probabilities(q, k, query_pos, key_pos, scale, window):
    """Full (H_q, w, n) attention with an explicit mask, float64: the formula, not the algorithm."""
    group = q.shape[0] // k.shape[0]
    keys = k.double().repeat_interleave(group, dim=0)  # (H_q, n, D)
    logits = q.double() @ keys.transpose(1, 2) * scale
    diff = query_pos[:, None] - key_pos[None, :]
    mask = (diff >= 0) & (diff < (window if window is not None else math.inf))
    return torch.softmax(logits.masked_fill(~mask, -math.inf), dim=-1).nan_to_num(0.0), mask


def dense_column_statistics(q, k, positions, scale, window):
    """H2O column sums and AUV row-scaled column means from the full n x n matrix."""
    probs, mask = dense_probabilities(q, k, positions, positions, scale, window)
    rows = mask.sum(dim=1).double()  # N_i
    scaled = probs * (rows / rows.max())[:, None]
    return probs.sum(dim=1), scaled.sum(dim=1) / mask.sum(dim=0)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("window", [None, 5])
def test_window_attention_equals_dense(group, window):
    q, k, positions = make_prompt(2 * group, 2, 40, 64)
    w = 6
    probs = window_attention(
        q[:, -w:],
        k,
        scale=0.125,
        query_positions=positions[-w:],
        key_positions=positions,
        sliding_window=window,
    )
    expected, _ = dense_probabilities(q[:, -w:], k, positions[-w:], positions, 0.125, window)
    assert probs.shape == (2 * group, w, 40) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.double(), expected, atol=1e-6, rtol=1e-5)


def test_visible_counts():
    positions = torch.tensor([0, 1, 2, 5, 6, 9])
    rows, cols = visible_counts(positions)
    assert rows.tolist() == [1, 2, 3, 4, 5, 6] and cols.tolist() == [6, 5, 4, 3, 2, 1]
    rows, cols = visible_counts(positions, sliding_window=3)  # i - p < 3
    assert rows.tolist() == [1, 2, 3, 1, 2, 1] and cols.tolist() == [3, 2, 1, 2, 1, 1]
    with pytest.raises(ValueError, match="strictly increasing"):
        visible_counts(torch.tensor([0, 2, 2]))


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("n, chunk", [(1, 64), (7, 3), (300, 64)])
@pytest.mark.parametrize("window", [None, 50])
def test_chunked_column_statistics_equal_dense(group, n, chunk, window):
    q, k, positions = make_prompt(2 * group, 2, n, 64, seed=n)
    stats = column_statistics_torch(
        q, k, scale=0.125, positions=positions, sliding_window=window, chunk=chunk
    )
    sums, auv = dense_column_statistics(q, k, positions, 0.125, window)
    torch.testing.assert_close(stats.sums.double(), sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.auv_means.double(), auv, atol=1e-6, rtol=1e-5)
    # Every query row sums to 1, so the column sums of each head add up to n.
    torch.testing.assert_close(stats.sums.sum(dim=1), torch.full((2 * group,), float(n)))


@needs_triton
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 23])
def test_triton_column_statistics_equal_torch(group, head_dim, dtype, window):
    q, k, positions = make_prompt(2 * group, 2, 75, head_dim, dtype=dtype, seed=head_dim)
    ref = column_statistics_torch(q, k, scale=0.1, positions=positions, sliding_window=window)
    q, k, positions = q.to(DEVICE), k.to(DEVICE), positions.to(DEVICE)
    out = column_statistics_triton(
        q, k, scale=0.1, positions=positions, sliding_window=window, block_m=16, block_n=32
    )
    torch.testing.assert_close(out.sums.cpu(), ref.sums, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.auv_means.cpu(), ref.auv_means, atol=1e-6, rtol=1e-4)


class LargestTensor(TorchDispatchMode):
    """Spy on every aten op: remember the most elements any tensor it produced had."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return result


def test_spy_catches_a_full_attention_matrix():
    """The spy used below does see an n x n tensor when one is computed."""
    q, k, positions = make_prompt(1, 1, 256, 16)
    with LargestTensor() as spy:
        dense_column_statistics(q, k, positions, 0.25, None)
    assert spy.largest >= 256 * 256


def test_column_statistics_never_hold_an_n_by_n_tensor():
    n, chunk = 8192, 256
    q, k, positions = make_prompt(2, 1, n, 16)
    with LargestTensor() as spy:
        stats = column_statistics(q, k, scale=0.25, positions=positions, chunk=chunk)
    assert spy.largest <= 2 * chunk * n  # (G, chunk, keys): 4M elements, against 67M for n x n
    assert spy.largest < n * n // 8
    torch.testing.assert_close(stats.sums.sum(dim=1), torch.full((2,), float(n)), rtol=1e-4, atol=0)


def test_column_statistics_dispatcher_equals_dense_on_this_device(monkeypatch):
    """The public dispatcher against the dense float64 formula, and the path it took: the
    Triton passes on CUDA, the chunked torch loop elsewhere."""
    import nanokv.kernels.prefill_scores as module

    calls = spy_on(monkeypatch, module, ("column_statistics_torch", "column_statistics_triton"))
    q, k, positions = make_prompt(6, 2, 75, 64, seed=5)
    sums, auv = dense_column_statistics(q, k, positions, 0.1, 23)
    stats = column_statistics(
        q.to(DEVICE), k.to(DEVICE), scale=0.1, positions=positions.to(DEVICE), sliding_window=23
    )
    assert stats.sums.device.type == DEVICE
    torch.testing.assert_close(stats.sums.cpu().double(), sums, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats.auv_means.cpu().double(), auv, atol=1e-6, rtol=1e-4)
    on_gpu = DEVICE == "cuda" and triton_available()
    assert calls == ["column_statistics_triton" if on_gpu else "column_statistics_torch"]


@pytest.mark.parametrize(
    "q_shape, k_shape, n_positions, message",
    [
        ((6, 40, 64), (2, 39, 64), 40, "k must have shape (*, 40, 64), got (2, 39, 64)"),
        ((6, 40, 64), (2, 40, 32), 40, "k must have shape (*, 40, 64), got (2, 40, 32)"),
        ((6, 40, 64), (4, 40, 64), 40, "q's 6 query heads do not split into k's 4 kv heads"),
        ((6, 40, 64), (2, 40, 64), 39, "positions must have shape (40,), got (39,)"),
        ((6, 40), (2, 40, 64), 40, "q must have shape (*, *, *), got (6, 40)"),
    ],
)
@pytest.mark.parametrize("run", ["dispatcher", "torch", "triton"])
def test_column_statistics_shape_errors_name_the_tensor(
    q_shape, k_shape, n_positions, message, run
):
    """ValueErrors (kept under `python -O`) before any computation or launch."""
    statistics = {
        "dispatcher": column_statistics,
        "torch": column_statistics_torch,
        "triton": column_statistics_triton,
    }[run]
    q, k = torch.zeros(q_shape), torch.zeros(k_shape)
    with pytest.raises(ValueError, match=re.escape(message)):
        statistics(q, k, scale=0.1, positions=torch.arange(n_positions))


def test_window_attention_and_block_size_errors():
    q, k, positions = make_prompt(6, 2, 40, 64)
    options = dict(scale=0.1, query_positions=positions[-6:], key_positions=positions)
    with pytest.raises(ValueError, match=re.escape("k must have shape (*, *, 64), got (2, 40, 8)")):
        window_attention(q[:, -6:], k[..., :8], **options)
    with pytest.raises(
        ValueError, match=re.escape("key_positions must have shape (40,), got (39,)")
    ):
        window_attention(q[:, -6:], k, **{**options, "key_positions": positions[1:]})
    with pytest.raises(
        ValueError, match=re.escape("query_positions must have shape (6,), got (5,)")
    ):
        window_attention(q[:, -6:], k, **{**options, "query_positions": positions[-5:]})
    with pytest.raises(ValueError, match="blocks of at least 16, got 8 x 64"):
        column_statistics_triton(q, k, scale=0.1, positions=positions, block_m=8)
