"""The projections of a decode step: fused weights, read once each, on the fastest path at hand.

Batch-1 decode is a chain of matrix-vector products, so its cost is the bytes of the weights.
Three things keep those reads few, large and exact where it matters:

- `fuse_rows` concatenates the weights that read the same input (q/k/v, gate/up) into one tensor
  at load time; the per-projection parameters become views of it, so checkpoint names, memory
  and `module.weight` stay as loaded.
- `linear` sends one row in bf16/fp16 on CPU through `torch.mv` where the weights are not
  packed: oneDNN's `F.linear` for a single row repacks the weight on every call and reads it at
  about half the speed (measured in `bench/e2e.py`'s development, AMX Xeon, 1 thread). Both
  accumulate in fp32; fp32 keeps `F.linear`, so fp32 results in the output-major layout
  (below) are bit-for-bit those of the unfused model.
- bf16 on a CPU with native bf16 instructions (AVX512-BF16 / AMX; `packing_for`) reads every
  projection and the LM head's GEMV from a copy packed once. Where a C compiler is at hand
  that is the blocks of kernels/cpu_linear.py (`packing="blocked"`), whose kernel also does
  what a decoder layer does next to a projection (the input's RMSNorm, RoPE, SiLU-GLU, the
  residual add) on the rows it holds, rounding once: on a 2-core AMD EPYC (Zen 5, one thread)
  the weights of a SmolLM2-135M step read in 8.1 ms against 9.8 for oneDNN's packed GEMV (33
  against 28 GB/s), and a decode step took 10.4 against 15.8 ms at 512 tokens (full cache) and
  12.3 against 17.9 at 5% of 8128 (laprox) (`python bench/weight_layout.py --threads 1 --dtype
  bfloat16`, docs/bench/weight_layout_bf16.jsonl). Elsewhere it is oneDNN's blocked layout
  (`packing="onednn"`), through the kernel inductor's CPU freezing uses (10.2 ms against
  18.2 with `F.linear` and 37.9 with `torch.mv` on the dense weights, same host), whose
  products are bit for bit `F.linear`'s on the dense weights (tests/test_packed_weights.py).
  A weight that something else reads stays a dense parameter too (the output projection: value
  norms; the LM head: embedding rows and the refined logits); those only `linear` reads (q/k/v,
  gate/up, down; OPT's fc1, fc2, project_out) are held packed alone, their parameters None
  (`fuse_rows`, `lay_out`), and a later `prepare_weights` takes them back from the packed
  copies.
- On AMD CPUs fp32 weights are stored input-major: each weight keeps its (out, in) shape and
  names, as a transposed view of an (in, out) tensor, so `F.linear` hands MKL the product
  `x @ W_t`. MKL's fp32 GEMV of one row reads an (out, in) weight markedly slower there: on a
  2-core AMD EPYC (AVX2, one thread) the weights of a SmolLM2-135M step read at 6.8 against
  8.8 GB/s, and a decode step took 1.27x less time at 512 tokens (full cache) and 1.15x at 5% of
  8128 (laprox), same greedy tokens (`bench/weight_layout.py`, docs/bench/weight_layout.jsonl).
  Prefill's GEMMs do not care. Intel CPUs (not measured in that layout yet) and half precision
  keep the output-major layout (`input_major_default`). Only a weight with at least as many
  outputs as inputs gains (`pays_input_major`), so a narrow weight (an MLP's down projection)
  stays output-major. SmolLM2-135M's step weights then read in 25.1 against
  26.3 ms, and a decode step took 1.03x less time at 512 tokens (full cache) and 1.02x at 5% of
  8128 (laprox) than with every weight input-major (`bench/weight_layout.py`,
  docs/bench/weight_layout_wide.jsonl).
- `head_logits` reads a half-precision LM head in its own dtype (half the bytes of an fp32 copy:
  the head is the largest single read of a step, 49152 x 576 in SmolLM2-135M) and then
  recomputes the `REFINED_LOGITS` largest logits of each row exactly in fp32 from the same
  weights. A half-precision GEMV sums in fp32 but rounds its output (steps of 0.125 at 30); the
  rounding error (2^-9 of a logit) is far smaller than the gap to the 64th logit, so the refined
  rows hold the exact top of the distribution, where greedy decoding, top-k / top-p and nearly
  all of the probability mass live, and the tail keeps its rounded values. Measured with
  `bench/dtype_fidelity.py` (bf16 vs fp32, 8 windows of 512 + 64 tokens of stdlib text): KL
  0.00068 and top-1 agreement 99.2%, against 0.00064 and 99.2% with the fp32 copy of the head
  this replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from nanokv.dtypes import half_is_native
from nanokv.kernels import cpu_linear
from nanokv.kernels.cpu_linear import BlockedWeight, RowRope
from nanokv.models.norm import RMSNorm

HALF = (torch.bfloat16, torch.float16)
ReadWeight = torch.Tensor | BlockedWeight  # what `linear` reads: a tensor or a packed copy


PACKINGS = ("onednn", "blocked")  # oneDNN's blocked layout; cpu_linear.c's (kernels/cpu_linear.py)


@dataclass(frozen=True)
class WeightLayout:
    """How `prepare_weights` holds the weights a step reads (see the module docstring):
    input-major where that pays, and/or read from packed copies (`packing`: oneDNN's, or the
    C kernel's blocks); the default is the checkpoint's layout, read as it is."""

    input_major: bool = False
    packing: str | None = None  # one of PACKINGS, or None

    def __post_init__(self) -> None:
        if self.packing not in (None, *PACKINGS):
            raise ValueError(f"unknown packing {self.packing!r}; choose one of {PACKINGS}")

    @classmethod
    def for_machine(cls, dtype: torch.dtype, device: torch.device) -> WeightLayout:
        """The loader's choice: input-major for fp32 on an AMD CPU, packed for bf16 on a CPU
        with bf16 instructions (`input_major_default`, `packing_for`)."""
        return cls(input_major_default(dtype, device), packing_for(dtype, device))

    @property
    def pack(self) -> bool:
        """Whether the projections are read from packed copies (of either kind)."""
        return self.packing is not None

    @property
    def unpacked(self) -> WeightLayout:
        """The same layout with the weights read as they are: what a weight that is not only a
        GEMV's (an embedding, the LM head's rows) or a reader of dense weights (inductor) gets."""
        return replace(self, packing=None)

    @property
    def name(self) -> str:
        """How results name it: 'c-blocked', 'onednn-packed', 'input-major' or 'output-major'."""
        if self.packing is not None:
            return {"onednn": "onednn-packed", "blocked": "c-blocked"}[self.packing]
        return "input-major" if self.input_major else "output-major"


AS_LOADED = WeightLayout()  # the checkpoint's layout, read as it is


def linear(
    x: torch.Tensor,
    weight: ReadWeight,
    bias: torch.Tensor | None,
    *,
    norm: RMSNorm | None = None,
    rope: RowRope | None = None,
    glu: Callable[[torch.Tensor], torch.Tensor] | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (T, in) -> residual + glu(rope(norm(x) @ weight (out, in)^T + bias)), (T, out) in
    x's dtype, or (T, out / 2) with `glu(y) = act(y[:, :out/2]) * y[:, out/2:]` (a fused
    gate/up weight); `rope` rotates the first heads of the output (fused q/k/v); `norm`,
    `rope`, `glu` and `residual` are optional. `weight` may be a packed copy (`packed`, a
    oneDNN tensor or the C kernel's blocks): blocked, the C kernel does the norm (RMSNorm),
    RoPE, SiLU-GLU and the residual add on the row it holds (kernels/cpu_linear.py);
    otherwise they are the same torch ops as unfused."""
    if isinstance(weight, BlockedWeight) and glu in (None, F.silu):
        row_norm = None if norm is None else norm.row_norm
        if norm is None or row_norm is not None:
            fused = {"norm": row_norm, "rope": rope, "glu": glu is not None}
            return cpu_linear.blocked_linear(x, weight, bias, residual=residual, **fused)
    if norm is not None:
        x = norm(x)
    y = _product(x, weight, bias)
    if rope is not None:
        y = rope(y)
    if glu is not None:
        gate, up = y.chunk(2, dim=-1)
        y = glu(gate) * up
    return y if residual is None else residual + y


@dataclass(frozen=True)
class Projection:
    """A weight as `linear` reads it and its bias."""

    weight: ReadWeight
    bias: torch.Tensor | None


def layer_finish(
    out_proj: Projection,
    norm: RMSNorm,
    gate_up: Projection,
    act: Callable[[torch.Tensor], torch.Tensor],
    down: Projection,
) -> cpu_linear.LayerFinish | None:
    """What the C kernel needs to do a pre-norm decoder layer's half after attention in one call
    (`cpu_linear.finish_layer`): where every weight is held in its blocks, the norm is RMSNorm and
    the activation SiLU; None elsewhere (the layer then calls `linear` three times)."""
    weights = (out_proj.weight, gate_up.weight, down.weight)
    blocked = all(isinstance(w, BlockedWeight) for w in weights)
    if not blocked or act is not F.silu or norm.row_norm is None:
        return None
    return cpu_linear.LayerFinish(
        out_proj.weight, out_proj.bias, norm.row_norm, gate_up.weight, gate_up.bias,
        down.weight, down.bias,
    )  # fmt: skip


def _product(x: torch.Tensor, weight: ReadWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x (T, in) @ weight (out, in)^T + bias -> (T, out), on the fastest path for its kind."""
    if isinstance(weight, BlockedWeight):
        return cpu_linear.blocked_linear(x, weight, bias)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if x.shape[0] == 1 and x.dtype in HALF and x.device.type == "cpu":
        out = torch.mv(weight, x[0]).unsqueeze(0)  # (1, out)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def input_major_default(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `prepare_weights` lays weights out input-major (see the module docstring): fp32
    on an AMD CPU, where it was measured faster; everything else keeps the checkpoint's layout."""
    return device.type == "cpu" and dtype == torch.float32 and cpu_vendor() == "AuthenticAMD"


def packing_for(dtype: torch.dtype, device: torch.device) -> str | None:
    """The packed copies `prepare_weights` reads the projections from (see the module
    docstring): for bf16 on a CPU with native bf16 instructions, the C kernel's blocks where it
    builds, else oneDNN's where oneDNN does bf16; None (the weights as they are) elsewhere."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not half_is_native("cpu"):
        return None
    if cpu_linear.available():
        return "blocked"
    return "onednn" if onednn_does_bf16() else None


def onednn_does_bf16() -> bool:
    """Whether torch's oneDNN runs bf16 kernels on this CPU (it refuses to pack bf16 weights on
    one without AVX-512)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packed(weight: torch.Tensor, packing: str = "onednn") -> ReadWeight:
    """A copy of `weight` (out, in) that only `linear` reads: in oneDNN's blocked layout (an
    opaque tensor: same values, no views, no indexing) or in the C kernel's blocks."""
    if packing == "blocked":
        return cpu_linear.block(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def is_packed(weight: object) -> bool:
    """Whether `weight` is a copy `packed` made (its values come back with `to_dense`)."""
    return isinstance(weight, BlockedWeight) or (
        isinstance(weight, torch.Tensor) and weight.is_mkldnn
    )


def read_copy(weight: torch.Tensor, layout: WeightLayout) -> ReadWeight:
    """The tensor `linear` reads for `weight`: its packed copy, or the weight itself (as a plain
    tensor, so that a module holding it registers no second parameter)."""
    return packed(weight, layout.packing) if layout.pack else weight.detach()


def cpu_vendor() -> str:
    """The CPU's vendor id from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"), "" if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def pays_input_major(weight: torch.Tensor) -> bool:
    """Whether a weight (out, in) reads faster input-major where the CPU prefers that layout at
    all: only with at least as many outputs as inputs (see the module docstring)."""
    return weight.shape[0] >= weight.shape[1]


def laid_out(weight: torch.Tensor, input_major: bool) -> torch.Tensor:
    """`weight` (out, in) with the same values, held input-major (a transposed view of a
    contiguous (in, out) tensor) or output-major (contiguous)."""
    if input_major:
        return weight.detach().T.contiguous().T
    return weight.detach().contiguous()


def is_input_major(weight: torch.Tensor) -> bool:
    """True for a 2-D weight held input-major (see `laid_out`)."""
    return weight.dim() == 2 and weight.shape[1] > 1 and weight.stride(0) == 1


def fuse_rows(
    *layers: nn.Linear,
    layout: WeightLayout = AS_LOADED,
    packed_before: ReadWeight | None = None,
) -> tuple[ReadWeight, torch.Tensor | None]:
    """One (sum of out, in) weight (and bias) for `layers` that share an input, held
    input-major (where that pays) or not (`laid_out`); each layer's parameters are rebound as
    views of the fused tensors, so nothing is held twice. Packed (`layout.pack`), what is
    returned is the packed copy and the layers' dense weights are released (their `weight` is
    None): `linear` reads only the copy. Called again it re-lays the same values out, taking
    them back from `packed_before` (the copy an earlier call returned) where they were
    released."""
    weight = _dense(torch.cat, [layer.weight for layer in layers], packed_before)
    weight = laid_out(weight, layout.input_major and pays_input_major(weight))
    biases = [layer.bias for layer in layers]
    bias = None if biases[0] is None else torch.cat(biases)
    start = 0
    for layer in layers:
        rows = slice(start, start + layer.out_features)
        layer.weight = None if layout.pack else nn.Parameter(weight[rows], requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias[rows], requires_grad=False)
        start = rows.stop
    return read_copy(weight, layout), bias


def lay_out(
    module: nn.Module,
    layout: WeightLayout = AS_LOADED,
    keep_dense: bool = True,
    packed_before: ReadWeight | None = None,
) -> ReadWeight:
    """Re-lays the weight of a Linear or Embedding module out (`laid_out`; input-major only
    where that pays), in place; returns what `linear` reads for it (`read_copy`). Packed and
    not `keep_dense` (a weight nothing but `linear` reads), the module's dense weight is
    released, to be taken back from `packed_before` by a later call, as in `fuse_rows`. An
    embedding laid out input-major still looks up rows (strided, one row a token)."""
    weight = _dense(lambda ws: ws[0], [module.weight], packed_before)
    weight = laid_out(weight, layout.input_major and pays_input_major(weight))
    dense = nn.Parameter(weight, requires_grad=False)
    module.weight = None if layout.pack and not keep_dense else dense
    return read_copy(dense, layout)


def _dense(
    join: Callable[[list[torch.Tensor]], torch.Tensor],
    weights: list[torch.Tensor | None],
    packed_before: ReadWeight | None,
) -> torch.Tensor:
    """The dense values of `weights` joined, or, where they were released, of their packed copy
    (`to_dense` gives back the values that were packed, bit for bit)."""
    if all(weight is not None for weight in weights):
        return join(weights)
    if not is_packed(packed_before):
        raise ValueError("a released weight needs the packed copy it was released for")
    return packed_before.to_dense()


REFINED_LOGITS = 64  # logits a row recomputes exactly in fp32 under a half-precision head


def head_weight(weight: torch.Tensor) -> torch.Tensor:
    """The LM head as `head_logits` reads it: the weight itself in the model's dtype (no copy),
    as a plain tensor that is no second parameter of the model."""
    return weight.detach()


def head_logits(
    h: torch.Tensor, head: torch.Tensor, head_read: ReadWeight | None = None
) -> torch.Tensor:
    """h (T, hidden) in any dtype, head (vocab, hidden) -> (T, vocab) fp32 logits: exact for an
    fp32 head; for a half-precision one, the GEMV in the head's dtype (from `head_read`, its
    packed copy, where there is one) with each row's `REFINED_LOGITS` largest logits recomputed
    in fp32 from `head` (see the module docstring). The C kernel's blocks give the GEMV's fp32
    sums as they are; other kernels round them to the head's dtype."""
    if head.dtype not in HALF:
        return F.linear(h.float(), head)
    gemv_weight = head if head_read is None else head_read
    if isinstance(gemv_weight, BlockedWeight):  # an fp32 row in, fp32 sums of its bf16 out
        logits = cpu_linear.blocked_linear(h.float(), gemv_weight)  # (T, vocab)
    else:
        logits = linear(h.to(head.dtype), gemv_weight, None).float()  # fp32 sums rounded
    top = logits.topk(min(REFINED_LOGITS, head.shape[0]), dim=-1).indices  # (T, k)
    rows = head.index_select(0, top.view(-1)).view(*top.shape, -1).float()  # (T, k, hidden)
    exact = torch.matmul(rows, h.float().unsqueeze(-1)).squeeze(-1)  # (T, k)
    return logits.scatter_(-1, top, exact)
