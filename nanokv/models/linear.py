"""The projections of a decode step: fused weights, read once each, on torch's fastest path.

Batch-1 decode is a chain of matrix-vector products, so its cost is the bytes of the weights.
Three things keep those reads few, large and exact where it matters:

- `fuse_rows` concatenates the weights that read the same input (q/k/v, gate/up) into one tensor
  at load time; the per-projection parameters become views of it, so checkpoint names, memory
  and `module.weight` stay as loaded.
- `linear` sends one row in bf16/fp16 on CPU through `torch.mv`: oneDNN's `F.linear` for a
  single row repacks the weight on every call and reads it at about half the speed (measured in
  `bench/e2e.py`'s development, AMX Xeon, 1 thread). Both accumulate in fp32; fp32 keeps
  `F.linear`, so fp32 results are bit-for-bit those of the unfused model.
- `head_weight` keeps the LM head in fp32 for a half-precision model and `head_logits` reads it
  once a step: a half-precision GEMM rounds its output, and logits rounded to bf16 (steps of
  0.125 at 30) cost as much fidelity as every other bf16 rounding of the model together (KL to
  fp32 over 512 tokens of code: 0.0013 with bf16 logits, 0.0008 with fp32 ones; top-1 agreement
  96.7% vs 97.9%). The price is the head's bytes: 21% of a bf16 step of SmolLM2-135M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HALF = (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (T, in) @ weight (out, in)^T + bias -> (T, out), in x's dtype."""
    if x.shape[0] == 1 and x.dtype in HALF and x.device.type == "cpu":
        out = torch.mv(weight, x[0]).unsqueeze(0)  # (1, out)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def fuse_rows(*layers: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (sum of out, in) weight (and bias) for `layers` that share an input; each layer's
    parameters are rebound as views of the fused tensors, so nothing is held twice."""
    weight = torch.cat([layer.weight for layer in layers])
    biases = [layer.bias for layer in layers]
    bias = None if biases[0] is None else torch.cat(biases)
    start = 0
    for layer in layers:
        rows = slice(start, start + layer.out_features)
        layer.weight = nn.Parameter(weight[rows], requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias[rows], requires_grad=False)
        start = rows.stop
    return weight, bias


def head_weight(weight: torch.Tensor) -> torch.Tensor:
    """The LM head as `head_logits` reads it: fp32 (a copy for a half-precision model, the same
    memory for an fp32 one), a plain tensor that is no second parameter of the model."""
    return weight.detach().float()


def head_logits(h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """h (T, hidden) in any dtype, head (vocab, hidden) fp32 -> (T, vocab) fp32 logits."""
    return F.linear(h.float(), head)
