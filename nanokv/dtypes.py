"""Which dtype a model runs in: the names accepted, and what `auto` picks on this machine.

Batch-1 decode reads every weight once a token, so halving the bytes (bf16) is the largest speed
lever there is, but only where the hardware does bf16 arithmetic natively: elsewhere torch
emulates it and bf16 runs slower than fp32. `auto` therefore picks bf16 on a CPU whose feature
flags say it has bf16 instructions (x86 AVX512-BF16 or AMX-BF16, Arm's BF16 extension) and on a
CUDA device that supports bf16, and fp32 everywhere else; it always says why.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip
AUTO = "auto"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (Linux names), Arm (Features: bf16)


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The bf16 arithmetic features this CPU reports (empty where none, or where the flags
    cannot be read: then bf16 is not assumed)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return ()
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present = set(value.split())
            return tuple(flag for flag in BF16_CPU_FLAGS if flag in present)
    return ()


@functools.cache
def half_is_native(device_type: str) -> bool:
    """Whether half precision runs natively on this device type: CUDA, or a CPU with bf16
    instructions (`cpu_bf16_flags`). Elsewhere torch converts every half-precision operand to
    fp32, and a small product can be faster taken in fp32 outright."""
    return device_type == "cuda" or (device_type == "cpu" and bool(cpu_bf16_flags()))


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")
) -> tuple[torch.dtype, str]:
    """(the dtype to load the model in, why). None and "auto" choose for `device`; a name or a
    torch dtype is taken as given; anything else is a ValueError naming the choices."""
    if isinstance(dtype, torch.dtype):
        return dtype, "given"
    if dtype is not None and dtype != AUTO:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
        return DTYPES[dtype], "given"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the CUDA device supports bf16"
        return torch.float32, "auto: the CUDA device has no bf16"
    flags = cpu_bf16_flags(cpuinfo) if device.type == "cpu" else ()
    if flags:
        return torch.bfloat16, f"auto: this CPU has native bf16 ({', '.join(flags)})"
    return torch.float32, f"auto: no native bf16 on this {device.type} (fp32 is faster there)"


def resolve_kv_dtype(kv_dtype: str | torch.dtype | None, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the KV cache (nanokv/models/kv_dtype.py): None or "auto" is the model's
    dtype, as vLLM's `kv_cache_dtype="auto"`; a name or a torch dtype is taken as given; anything
    else is a ValueError naming the choices."""
    if isinstance(kv_dtype, torch.dtype) and kv_dtype in DTYPES.values():
        return kv_dtype
    if kv_dtype is None or kv_dtype == AUTO:
        return model_dtype
    if kv_dtype not in DTYPES:
        raise ValueError(
            f"unknown KV cache dtype {kv_dtype!r}; choose auto (the model's), float32, bfloat16 "
            "or float16"
        )
    return DTYPES[kv_dtype]


def dtype_label(weights: torch.dtype, kv: torch.dtype) -> str:
    """How results name a model's dtypes: the weights' ('float32'), with the KV cache's after
    it where that differs ('float32+kv-bfloat16')."""
    weights_name, kv_name = (str(d).removeprefix("torch.") for d in (weights, kv))
    return weights_name if kv_name == weights_name else f"{weights_name}+kv-{kv_name}"
