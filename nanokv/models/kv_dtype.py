"""The dtype a model's attention and KV cache run in, which may differ from its weights'.

vLLM's `kv_cache_dtype`: an fp32 model (what `--dtype auto` picks on a CPU without native bf16,
where bf16 weights read slower) can hold its cache in bf16 at half the bytes a token, so a fixed
KV memory serves twice the tokens. Each block rounds q, k and v to that dtype as `qkv` hands them
out (after RoPE), and `finish` takes the attention output back to the hidden states' dtype; the
engine reads the dtype here to size its arena. Everything between -- the arena, the decode and
prefill kernels, the probe, Quest's page bounds -- sees one dtype, so none of it changes.
"""

from __future__ import annotations

import torch
from torch import nn


def set_kv_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Makes every block hand q, k and v out in `dtype` (None: the weights' dtype, no copy)."""
    weights = next(model.parameters()).dtype
    for block in model.blocks:
        block.kv_dtype = None if dtype == weights else dtype


def kv_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's attention and KV cache run in (see `set_kv_dtype`)."""
    return model.blocks[0].kv_dtype or next(model.parameters()).dtype


def to_kv_dtype(dtype: torch.dtype | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A block's q, k, v as `qkv` hands them out: in `dtype` when one is set, else unchanged."""
    if dtype is None:
        return tensors
    return tuple(tensor.to(dtype) for tensor in tensors)
