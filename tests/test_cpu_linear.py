"""The C kernel of a decode step's projections (kernels/cpu_linear.py, cpu_linear.c) against a
float64 computation of its contract: blocks that hold the weight bit for bit, the product with
fp32 sums, and the norm, bias, RoPE, SiLU-GLU and residual add done around it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from nanokv.config import RopeConfig
from nanokv.kernels import cpu_linear
from nanokv.kernels.cpu_linear import RowNorm
from nanokv.models.rope import Rotary, RotatedHeads

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="cpu_linear.c did not build")
SHAPES = [(96, 64), (17, 7), (40, 33), (2, 2)]  # (out, in): whole and partial blocks, odd inputs
HEAD_DIM = 8


def _weight(out: int, in_: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out, in_, generator=generator).bfloat16()


@pytest.mark.parametrize(("out", "in_"), [*SHAPES, (1, 1), (33, 128)])
def test_blocks_hold_the_weight_bit_for_bit(out, in_):
    weight = _weight(out, in_)
    blocked = cpu_linear.block(weight)
    assert blocked.blocks.shape == (-(-out // 16), -(-in_ // 2), 16, 2)
    assert blocked.shape == weight.shape and blocked.dtype == torch.bfloat16
    assert torch.equal(blocked.to_dense(), weight)


@pytest.mark.parametrize("weight", [torch.randn(4, 4), torch.randn(4).bfloat16()])
def test_only_a_2d_bf16_weight_is_blocked(weight):
    with pytest.raises(ValueError, match="only a 2-D bf16 CPU weight can be blocked"):
        cpu_linear.block(weight)


def _rope(rows: int, width: int) -> RotatedHeads:
    rotary = Rotary(RopeConfig(theta=500.0), HEAD_DIM)
    return RotatedHeads(rotary, torch.arange(rows) * 37 + 5, width, HEAD_DIM)


def _expected(x, weight, bias, norm, rope, glu, residual) -> torch.Tensor:
    """The contract in float64 from the bf16-rounded (normalised) input rows."""
    rows = (x if norm is None else norm(x)).bfloat16().double()
    y = rows @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    if rope is not None:
        cos, sin = (table.double() for table in rope.tables(torch.float32))
        heads = y[:, : rope.width].view(y.shape[0], -1, HEAD_DIM)
        rotated = heads * cos + heads.roll(HEAD_DIM // 2, -1) * sin
        y = torch.cat([rotated.flatten(1), y[:, rope.width :]], dim=1)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else y + residual.double()


FEATURES = list(itertools.product([False, True], repeat=5))  # bias, norm, rope, glu, residual


@pytest.mark.parametrize(("bias_on", "norm_on", "rope_on", "glu", "residual_on"), FEATURES)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_the_kernel_computes_its_contract(
    bias_on, norm_on, rope_on, glu, residual_on, x_dtype, rows
):
    """Every combination of what it fuses, against float64; the torch path too (it rounds
    between its ops, so both get the tolerance of a few bf16 roundings)."""
    out, in_ = (48, 40) if rope_on else (34, 21)  # rope: 3 heads of 8 in the first 24 outputs
    weight = _weight(out, in_)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_, generator=generator).to(x_dtype)
    bias = torch.randn(out, generator=generator).bfloat16() if bias_on else None
    norm = RowNorm(torch.rand(in_, generator=generator) + 0.5, 1e-5) if norm_on else None
    rope = _rope(rows, 24) if rope_on else None
    width = out // 2 if glu else out
    residual = torch.randn(rows, width, generator=generator).to(x_dtype) if residual_on else None
    fused = {"norm": norm, "rope": rope, "glu": glu, "residual": residual}
    expected = _expected(x, weight, bias, norm, rope, glu, residual)
    blocked = cpu_linear.block(weight)
    for run in (cpu_linear.blocked_linear, cpu_linear.reference_linear):
        y = run(x, blocked, bias, **fused)
        assert y.shape == (rows, width) and y.dtype == x_dtype
        assert (y.double() - expected).abs().max() <= 0.01 * expected.abs().max() + 1e-3


def test_fp32_rows_get_fp32_sums_of_their_bf16_rounding():
    """No norm, fp32 in and out: the only rounding is the input's to bf16; the sums are fp32
    (relative error ~1e-6 of the absolute products), not rounded to bf16 on the way out."""
    weight = _weight(200, 576)
    x = torch.randn(2, 576)
    y = cpu_linear.blocked_linear(x, cpu_linear.block(weight))
    exact = x.bfloat16().double() @ weight.double().T
    magnitude = x.bfloat16().double().abs() @ weight.double().abs().T
    assert y.dtype == torch.float32
    assert ((y.double() - exact).abs() <= 1e-5 * magnitude).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_gets_the_same_bits_whatever_rows_are_beside_it(threads):
    """A token decoded alone or in a prefill chunk of any size (threaded from THREADED_ROWS
    rows on) gives the same outputs, bit for bit."""
    weight = cpu_linear.block(_weight(70, 45))
    norm = RowNorm(torch.rand(45) + 0.5, 1e-5)
    x = torch.randn(cpu_linear.THREADED_ROWS + 7, 45).bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = cpu_linear.blocked_linear(x, weight, norm=norm, glu=True)
    finally:
        torch.set_num_threads(before)
    for rows in [slice(0, 1), slice(5, 8), slice(9, 13), slice(20, 39)]:
        assert torch.equal(
            cpu_linear.blocked_linear(x[rows], weight, norm=norm, glu=True), together[rows]
        )


@pytest.mark.parametrize(
    ("x_shape", "bias_dtype", "glu", "residual_shape", "message"),
    [
        ((1, 15), None, False, None, "x must be 2-D with 16 columns"),
        ((16,), None, False, None, "x must be 2-D with 16 columns"),
        ((1, 16), None, True, None, "an odd number of outputs"),
        ((1, 16), None, False, (1, 30), "residual must have shape"),
        ((1, 16), torch.float32, False, None, "bias must be bf16"),
    ],
)
def test_operands_that_do_not_fit_are_refused(x_shape, bias_dtype, glu, residual_shape, message):
    weight = cpu_linear.block(_weight(31, 16))
    bias = None if bias_dtype is None else torch.zeros(31, dtype=bias_dtype)
    residual = None if residual_shape is None else torch.zeros(residual_shape).bfloat16()
    for run in (cpu_linear.blocked_linear, cpu_linear.reference_linear):
        with pytest.raises(ValueError, match=message):
            run(torch.zeros(x_shape).bfloat16(), weight, bias, glu=glu, residual=residual)


def _layer_finish(hidden: int = 48, width: int = 40, attn: int = 32) -> cpu_linear.LayerFinish:
    generator = torch.Generator().manual_seed(3)
    out_proj, gate_up, down = (
        cpu_linear.block(_weight(*shape, seed=seed))
        for seed, shape in enumerate([(hidden, attn), (2 * width, hidden), (hidden, width)])
    )
    biases = [torch.randn(n, generator=generator).bfloat16() for n in (hidden, 2 * width, hidden)]
    norm = RowNorm(torch.rand(hidden, generator=generator) + 0.5, 1e-5)
    return cpu_linear.LayerFinish(out_proj, biases[0], norm, gate_up, biases[1], down, biases[2])


@pytest.mark.parametrize("attn_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5])
def test_the_layer_finish_in_one_call_is_its_three_calls_bit_for_bit(attn_dtype, rows):
    w = _layer_finish()
    h = torch.randn(rows, 48).bfloat16()
    attn_out = torch.randn(rows, 32).to(attn_dtype)
    mid = cpu_linear.blocked_linear(attn_out.bfloat16(), w.out_proj, w.out_bias, residual=h)
    glu = cpu_linear.blocked_linear(mid, w.gate_up, w.gate_up_bias, norm=w.norm, glu=True)
    expected = cpu_linear.blocked_linear(glu, w.down, w.down_bias, residual=mid)
    assert torch.equal(cpu_linear.finish_layer(h, attn_out, w), expected)


def test_weights_that_do_not_chain_are_refused():
    w = _layer_finish()
    with pytest.raises(ValueError, match="do not chain"):
        cpu_linear.LayerFinish(
            w.out_proj, None, w.norm, w.gate_up, None, cpu_linear.block(_weight(48, 41)), None
        )
