"""Rotary position embeddings: the inverse frequencies of each rope type and their application."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanokv.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, scaled as `rope.kind` prescribes."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        return _llama3_frequencies(inv_freq, rope)
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1's band-wise scaling: long wavelengths divided by `factor`, short ones kept,
    the band between interpolated smoothly (Meta's reference `apply_scaling`)."""
    low_freq_wavelen = rope.original_max_position / rope.low_freq_factor
    high_freq_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary(torch.nn.Module):
    """Applies RoPE to (T, heads, head_dim) tensors given each row's absolute position.

    One instance is shared by all layers, and every layer of a step asks for the same positions:
    on CPU the last tables are kept and reused while the positions (compared by value, a few
    integers) and the dtype repeat. On CUDA the comparison would wait for the device, so the
    tables are recomputed."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.rope, self.head_dim = rope, head_dim
        self.register_buffer("inv_freq", inverse_frequencies(rope, head_dim), persistent=False)
        self._last: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def materialize(self, device: torch.device) -> None:
        """Recomputes the buffer on `device` (a model built on `meta` has none)."""
        self.inv_freq = inverse_frequencies(self.rope, self.head_dim).to(device)
        self._last = None

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(T, 1, D) cos and signed sin of positions (T,), in `dtype`: the sin's first half is
        negated, which is what `apply`'s rotation by half the head needs."""
        last = self._last
        if (
            last is not None
            and last[1] == dtype
            and last[0].shape == positions.shape
            and torch.equal(last[0], positions)
        ):
            return last[2], last[3]
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # (T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (T, 1, D)
        sign = torch.ones_like(angles)
        sign[..., : self.head_dim // 2] = -1
        cos, sin = angles.cos().to(dtype), (angles.sin() * sign).to(dtype)
        if positions.device.type == "cpu":
            self._last = (positions.clone(), dtype, cos, sin)
        return cos, sin

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), as x rolled by half
        the head times the signed sin: the same products (a negation is exact), in four ops
        instead of seven, which counts in a decode step's thirty layers."""
        return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


@dataclass(frozen=True)
class RotatedHeads:
    """RoPE of a fused q/k/v projection's first `width` outputs (the query and key heads of
    `head_dim`) at each row's position, as `models.linear.linear` takes it (`RowRope`)."""

    rotary: Rotary
    positions: torch.Tensor  # (T,)
    width: int
    head_dim: int

    def tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 1, head_dim) cos and signed sin (`Rotary.cos_sin`)."""
        return self.rotary.cos_sin(self.positions, dtype)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """y (T, out) with its first `width` columns rotated in place, in y's dtype."""
        rows = y.shape[0]
        heads = y[:, : self.width].view(rows, -1, self.head_dim)
        y[:, : self.width] = Rotary.apply(heads, *self.tables(y.dtype)).view(rows, self.width)
        return y
