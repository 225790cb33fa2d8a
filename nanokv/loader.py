"""Loads a Hugging Face-layout checkpoint into a nanokv model, through safetensors only.

A model directory is untrusted input: every safetensors header is parsed and checked (offsets
inside the file, sizes matching shapes and dtypes, shapes matching the config) before a tensor is
read, and shard names from an index must stay inside the directory. No pickle is ever loaded.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from nanokv.config import ConfigError, ModelConfig
from nanokv.models import build_model
from nanokv.models.linear import WeightLayout
from nanokv.models.rope import Rotary

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class LoadError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match its config."""


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def resolve_model_dir(path: str | Path) -> Path:
    """The resolved directory, or a LoadError that says what is wrong with it."""
    model_dir = Path(path).expanduser().resolve()
    if not model_dir.exists():
        raise LoadError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise LoadError(f"{model_dir} is not a directory (pass the folder holding config.json)")
    return model_dir


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parses and validates one file's header; raises LoadError on anything inconsistent."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise LoadError(f"{path.name} is truncated: no safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise LoadError(f"{path.name} is corrupt or truncated: header length {header_len}")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LoadError(f"{path.name} has a corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise LoadError(f"{path.name} has a corrupt safetensors header")
    data_bytes = size - 8 - header_len
    return {
        name: _check_entry(path, name, info, data_bytes)
        for name, info in header.items()
        if name != "__metadata__"
    }


def _check_entry(path: Path, name: str, info: object, data_bytes: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (TypeError, KeyError, ValueError) as exc:
        raise LoadError(f"{path.name}: malformed header entry for {name}") from exc
    if dtype not in DTYPE_BYTES or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise LoadError(f"{path.name}: tensor {name} has invalid dtype {dtype} or shape {shape}")
    numel = 1
    for dim in shape:
        numel *= dim
    if not (0 <= begin <= end <= data_bytes) or end - begin != numel * DTYPE_BYTES[dtype]:
        raise LoadError(
            f"{path.name} is corrupt or truncated: tensor {name} lies at bytes {begin}-{end} "
            f"of a {data_bytes}-byte data section"
        )
    return TensorEntry(path, dtype, shape)


def checkpoint_tensors(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of a single-file or sharded checkpoint, headers validated."""
    index_path, single = model_dir / INDEX_NAME, model_dir / SINGLE_NAME
    if index_path.is_file():
        files = _shard_files(model_dir, index_path)
    elif single.is_file():
        files = [single]
    else:
        raise LoadError(f"no {SINGLE_NAME} or {INDEX_NAME} in {model_dir}")
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        tensors.update(read_safetensors_header(file))
    return tensors


def _shard_files(model_dir: Path, index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LoadError(f"{index_path.name} is not a valid safetensors index: {exc}") from exc
    files = []
    for name in sorted(set(weight_map.values())):
        shard = (model_dir / name).resolve()
        if shard.parent != model_dir:
            raise LoadError(f"{index_path.name} names a shard outside the model directory: {name}")
        if not shard.is_file():
            raise LoadError(f"shard {name} listed in {index_path.name} is missing")
        files.append(shard)
    return files


def load_model(
    model_dir: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """Builds the model for `cfg` and fills it from the checkpoint, checked tensor by tensor,
    then fuses its projections, lays them out for this machine's GEMV and sets the LM head its
    logits read (models/linear.py; the checkpoint's names and shapes do not change)."""
    with torch.device("meta"):
        model = build_model(cfg)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    available = checkpoint_tensors(model_dir)
    for name, shape in expected.items():
        _check_tensor(name, shape, available.get(name), model_dir)
    state = {}
    for file in sorted({available[name].file for name in expected}):
        names = [name for name in expected if available[name].file == file]
        for name, tensor in _read_tensors(file, names).items():
            state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True)
    model.prepare_weights(WeightLayout.for_machine(dtype, device))
    for module in model.modules():
        if isinstance(module, Rotary):
            module.materialize(device)
    return model.eval().requires_grad_(False)


def _check_tensor(
    name: str, shape: tuple[int, ...], entry: TensorEntry | None, model_dir: Path
) -> None:
    if entry is None:
        raise LoadError(f"tensor {name} is missing from the checkpoint in {model_dir}")
    if entry.shape != shape or entry.dtype not in FLOAT_DTYPES:
        raise LoadError(
            f"tensor {name} is {entry.dtype}{list(entry.shape)} in {entry.file.name}, "
            f"the config needs a float tensor of shape {list(shape)}"
        )


def _read_tensors(file: Path, names: list[str]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(file, framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in names}
    except Exception as exc:  # safetensors raises its own error types
        raise LoadError(f"cannot read {file.name}: {exc}") from exc


def load_config(model_dir: Path) -> ModelConfig:
    """The model's config, with ConfigError turned into the loader's one-line error."""
    try:
        return ModelConfig.from_dir(model_dir)
    except ConfigError as exc:
        raise LoadError(str(exc)) from exc
