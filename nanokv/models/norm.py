"""RMSNorm (Llama, Mistral), with an fp32 copy of a half-precision weight for its one rounding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanokv.kernels.cpu_linear import RowNorm


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.weight_fp32: torch.Tensor | None = None  # set by `prepare` for half precision
        self.row_norm: RowNorm | None = None  # the same norm as a projection kernel takes it

    def prepare(self) -> None:
        """Keeps an fp32 copy of a half-precision weight (hidden floats) for `forward`, and the
        norm as `models.linear.linear` hands it to a kernel that normalises its input rows."""
        half = self.weight.dtype != torch.float32
        self.weight_fp32 = self.weight.detach().float() if half else None
        fp32 = self.weight.detach() if self.weight_fp32 is None else self.weight_fp32
        self.row_norm = RowNorm(fp32, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised in fp32 whatever x's dtype, rounded once (one call; fp32 results are
        bit-for-bit those of `weight * (x * rsqrt(mean(x^2) + eps))`). A half-precision x goes
        through the fp32 kernel and is rounded at the end, with the same bits: on CPU the fused
        kernel's bf16 path cost ~85 us a call inside a decode step against ~14 us this way
        (30 layers x 2 norms a step)."""
        if self.weight_fp32 is None or x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, self.weight_fp32, self.eps).to(x.dtype)
