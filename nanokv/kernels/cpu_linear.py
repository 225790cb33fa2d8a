"""A decode step's projections on the CPU: a bf16 weight held in blocks, read by cpu_linear.c.

Why: batch-1 decode reads every weight once a token, and its projections are most of a step
(models/linear.py). oneDNN's packed bf16 GEMV read SmolLM2-135M's step weights at ~28 GB/s
on a 2-core AMD EPYC (Zen 5, AVX512-BF16, one thread) where a single stream of 64-byte lines,
each one AVX512-BF16 instruction, reads them at ~33-37 (`bench/weight_layout.py --dtype
bfloat16`: 8.1 against 9.8 ms for the step's 121 GEMVs). A decoder layer's small ops next to
its projections (RMSNorm of the input, RoPE, SiLU(gate) * up, the residual add) each cost a few
microseconds of dispatch a call, thirty layers a step, so the kernel does them on the rows it
already holds: a decode step at 512 tokens took 10.4 against 15.8 ms with oneDNN's GEMVs and
torch's ops (same bench, docs/bench/weight_layout_bf16.jsonl).

Contract of `blocked_linear(x, weight, bias, norm=, rope=, glu=, residual=)`, x (T, in):
`residual + glu(rope(W @ rms_norm(x) + bias))`, (T, out) or (T, out / 2) with `glu`, where
`rms_norm(x) = x / sqrt(mean(x^2) + eps) * norm_weight` in fp32, rounded to bf16 (the kernel
multiplies bf16 pairs), `rope` rotates the first `rope.width` outputs, heads of
`rope.head_dim`, by each row's position (`y * cos + rotate_half(y) * sin`), and
`glu(y) = silu(y[:, :out/2]) * y[:, out/2:]`; everything after the products in fp32, the output
rounded once to the residual's (x's) dtype. Each row's sums are added in the same order
whatever the rows beside it, so a token gets the same bits decoded alone or prefilled in a
chunk (the context and conversation paths rely on that). The torch path (`reference_linear`,
where the library is not built) computes the same thing op by op with torch's rounding between
them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from nanokv.kernels import native

BLOCK = 16  # outputs a block, as in cpu_linear.c
KINDS = native.KINDS
THREADED_ROWS = 32  # from this many rows (a prefill chunk) the product runs on torch's threads
_I64, _INT, _PTR, _F32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
SIGNATURES = {
    "blocked_linear": [_PTR, _I64, _I64, _PTR, _INT, _I64, _I64, _PTR, _F32, _PTR, _PTR, _PTR,
                       _I64, _I64, _INT, _PTR, _I64, _PTR, _INT, _I64, _INT],
    "decoder_finish": [_PTR, _PTR, _I64, _PTR, _PTR, _I64, _PTR, _F32, _PTR, _PTR, _PTR, _INT,
                       _PTR, _PTR, _INT, _I64, _I64, _INT],
}  # fmt: skip


@dataclass(frozen=True, eq=False)
class BlockedWeight:
    """A bf16 weight (out, in) as cpu_linear.c reads it: blocks (ceil(out / 16), ceil(in / 2),
    16, 2), 16 outputs' weights for one pair of inputs in each 64-byte line, zero padded."""

    blocks: torch.Tensor
    out_features: int
    in_features: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype

    def to_dense(self) -> torch.Tensor:
        """The weight (out, in) with the values it was blocked from, bit for bit."""
        out_blocks, in_pairs = self.blocks.shape[:2]
        dense = self.blocks.permute(0, 2, 1, 3).reshape(out_blocks * BLOCK, in_pairs * 2)
        return dense[: self.out_features, : self.in_features].contiguous()


def block(weight: torch.Tensor) -> BlockedWeight:
    """`weight` (out, in), bf16 on the CPU, copied into blocks (see `BlockedWeight`)."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
        kind = f"{weight.dtype} {tuple(weight.shape)} on {weight.device}"
        raise ValueError(f"only a 2-D bf16 CPU weight can be blocked, not {kind}")
    out, in_ = weight.shape
    padded = F.pad(weight.detach(), (0, in_ % 2, 0, -out % BLOCK))
    blocks = padded.view(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // 2, 2)
    return BlockedWeight(blocks.permute(0, 2, 1, 3).contiguous(), out, in_)


def available() -> bool:
    """Whether cpu_linear.c is built (False where `NANOKV_NATIVE=0` or no compiler)."""
    return native.library("cpu_linear") is not None


def _kernel(name: str = "blocked_linear") -> ctypes._CFuncPtr | None:
    """The C function `name` of cpu_linear.c, typed; None where the library is not built."""
    return native.function("cpu_linear", name, SIGNATURES[name])


class RowRope(Protocol):
    """RoPE of a projection's first `width` outputs, heads of `head_dim`, at each row's
    position (models/rope.py's `RotatedHeads`)."""

    width: int
    head_dim: int

    def tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 1, head_dim) cos and sin with its first half negated, in `dtype`."""
        ...

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """The torch path: y (T, out) with its first `width` columns rotated, in y's dtype."""
        ...


@dataclass(frozen=True)
class RowNorm:
    """RMSNorm of the input rows before the product: fp32 weight (in,) and epsilon."""

    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The torch path's norm: in fp32, rounded once to x's dtype."""
        return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps).to(x.dtype)


def blocked_linear(
    x: torch.Tensor,
    weight: BlockedWeight,
    bias: torch.Tensor | None = None,
    *,
    norm: RowNorm | None = None,
    rope: RowRope | None = None,
    glu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (T, in) -> residual + glu(rope(W @ norm(x) + bias)) (see the module docstring), in
    residual's dtype if given, else x's; the C kernel where it is built (torch ops elsewhere)."""
    width = check_operands(x, weight, bias, glu, residual)
    kernel = _kernel()
    out_dtype = x.dtype if residual is None else residual.dtype
    if kernel is None or x.dtype not in KINDS or out_dtype not in KINDS:
        return reference_linear(x, weight, bias, norm=norm, rope=rope, glu=glu, residual=residual)
    x, rows = x.contiguous(), x.shape[0]
    y = torch.empty(rows, width, dtype=out_dtype)
    residual, bias = (t if t is None else t.contiguous() for t in (residual, bias))
    cos, sin = (None, None) if rope is None else rope.tables(torch.float32)
    status = kernel(
        weight.blocks.data_ptr(), weight.out_features, weight.in_features,
        x.data_ptr(), KINDS[x.dtype], rows, x.shape[1],
        None if norm is None else norm.weight.data_ptr(), 0.0 if norm is None else norm.eps,
        _pointer(bias), None if cos is None else cos.contiguous().data_ptr(),
        None if sin is None else sin.contiguous().data_ptr(),
        0 if rope is None else rope.width, 0 if rope is None else rope.head_dim,
        int(glu), _pointer(residual), width,
        y.data_ptr(), KINDS[out_dtype], width,
        torch.get_num_threads() if rows >= THREADED_ROWS else 1,
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"cpu_linear.c: blocked_linear returned {status}")
    return y


def reference_linear(
    x: torch.Tensor,
    weight: BlockedWeight,
    bias: torch.Tensor | None = None,
    *,
    norm: RowNorm | None = None,
    rope: RowRope | None = None,
    glu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same contract in torch ops over the dense weight (a temporary copy)."""
    check_operands(x, weight, bias, glu, residual)
    out_dtype = x.dtype if residual is None else residual.dtype
    if norm is not None:
        x = norm(x)
    y = F.linear(x.to(weight.dtype), weight.to_dense(), bias)
    if rope is not None:
        y = rope(y)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y.to(out_dtype) if residual is None else residual + y.to(out_dtype)


def check_operands(
    x: torch.Tensor,
    weight: BlockedWeight,
    bias: torch.Tensor | None,
    glu: bool,
    residual: torch.Tensor | None,
) -> int:
    """The output's width; ValueError for operands that do not fit the weight (the kernel
    would read or write past them)."""
    out, in_ = weight.out_features, weight.in_features
    if x.dim() != 2 or x.shape[1] != in_:
        raise ValueError(f"x must be 2-D with {in_} columns, got {tuple(x.shape)}")
    if bias is not None and (bias.dtype != weight.dtype or bias.shape != (out,)):
        raise ValueError(
            f"bias must be bf16 of shape ({out},), got {bias.dtype} {tuple(bias.shape)}"
        )
    if glu and out % 2:
        raise ValueError(
            f"SiLU-GLU needs an even number of outputs, not an odd number of outputs ({out})"
        )
    width = out // 2 if glu else out
    if residual is not None and residual.shape != (x.shape[0], width):
        raise ValueError(
            f"residual must have shape ({x.shape[0]}, {width}), got {tuple(residual.shape)}"
        )
    return width


@dataclass(frozen=True, eq=False)
class LayerFinish:
    """The weights of a pre-norm decoder layer's half after its attention (Llama, Mistral), as
    `finish_layer` reads them: the output projection, the MLP's norm, fused gate/up (SiLU) and
    down projection; biases bf16 or None."""

    out_proj: BlockedWeight
    out_bias: torch.Tensor | None
    norm: RowNorm
    gate_up: BlockedWeight
    gate_up_bias: torch.Tensor | None
    down: BlockedWeight
    down_bias: torch.Tensor | None

    def __post_init__(self) -> None:
        hidden = self.out_proj.out_features
        fits = (
            self.gate_up.in_features == hidden == self.down.out_features
            and self.gate_up.out_features == 2 * self.down.in_features
            and self.norm.weight.shape == (hidden,)
        )
        if not fits:
            raise ValueError("the output projection, gate/up and down weights do not chain")


def finish_layer(h: torch.Tensor, attn_out: torch.Tensor, weights: LayerFinish) -> torch.Tensor:
    """h (T, hidden), attn_out (T, H_q * D) -> mid + down(silu(gate) * up) with
    mid = h + out_proj(attn_out) and (gate, up) = gate_up(rms_norm(mid)), in h's dtype: the three
    `blocked_linear` calls it stands for, bit for bit, in one call to cpu_linear.c."""
    w = weights
    kernel = _kernel("decoder_finish")
    hidden = w.out_proj.out_features
    fits = (
        h.dim() == 2
        and h.shape[1] == hidden
        and attn_out.shape == (h.shape[0], w.out_proj.in_features)
    )
    if kernel is None or not fits or h.dtype not in KINDS or attn_out.dtype not in KINDS:
        mid = blocked_linear(attn_out.to(h.dtype), w.out_proj, w.out_bias, residual=h)
        glu = blocked_linear(mid, w.gate_up, w.gate_up_bias, norm=w.norm, glu=True)
        return blocked_linear(glu, w.down, w.down_bias, residual=mid)
    h, attn_out = h.contiguous(), attn_out.contiguous()
    out = torch.empty_like(h)
    rows = h.shape[0]
    status = kernel(
        w.out_proj.blocks.data_ptr(), _pointer(w.out_bias), w.out_proj.in_features,
        w.gate_up.blocks.data_ptr(), _pointer(w.gate_up_bias), w.gate_up.out_features,
        w.norm.weight.data_ptr(), w.norm.eps, w.down.blocks.data_ptr(), _pointer(w.down_bias),
        attn_out.data_ptr(), KINDS[attn_out.dtype], h.data_ptr(), out.data_ptr(), KINDS[h.dtype],
        rows, hidden, torch.get_num_threads() if rows >= THREADED_ROWS else 1,
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"cpu_linear.c: decoder_finish returned {status}")
    return out


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()
