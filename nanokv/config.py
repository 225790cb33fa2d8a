"""ModelConfig: the architecture facts nanokv needs, read once from a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "opt")


class ConfigError(ValueError):
    """A model directory or its config.json cannot be used."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `kind` is 'default', 'linear' or 'llama3'."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """One decoder-only transformer, whichever family it comes from."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # OPT only
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    layer_norm_affine: bool = True
    final_layer_norm: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {self.model_type!r}: nanokv supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"config.json: {name} must be positive, got {getattr(self, name)}"
                )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: a model directory needs a config.json")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {model_type!r} in config.json: nanokv supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            fields = _opt_fields(raw) if model_type == "opt" else _llama_fields(raw)
        except KeyError as exc:
            msg = f"config.json lacks {exc.args[0]!r} for model_type {model_type}"
            raise ConfigError(msg) from exc
        return cls(model_type=model_type, **fields, **_token_ids(raw))


def _token_ids(raw: dict[str, Any]) -> dict[str, Any]:
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return {"bos_token_id": raw.get("bos_token_id"), "eos_token_ids": eos_ids}


def _llama_fields(raw: dict[str, Any]) -> dict[str, Any]:
    heads = raw["num_attention_heads"]
    hidden = raw["hidden_size"]
    window = raw.get("sliding_window") if raw["model_type"] == "mistral" else None
    return {
        "vocab_size": raw["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": raw["intermediate_size"],
        "num_layers": raw["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": raw.get("num_key_value_heads") or heads,
        "head_dim": raw.get("head_dim") or hidden // heads,
        "max_position_embeddings": raw.get("max_position_embeddings", 2048),
        "norm_eps": raw.get("rms_norm_eps", 1e-6),
        "rope": _rope(raw),
        "tie_word_embeddings": raw.get("tie_word_embeddings", False),
        "sliding_window": window,
        "attention_bias": raw.get("attention_bias", False),
        "mlp_bias": raw.get("mlp_bias", False),
        "hidden_act": raw.get("hidden_act", "silu"),
    }


def _rope(raw: dict[str, Any]) -> RopeConfig:
    """Reads both config styles: `rope_theta` + `rope_scaling` (transformers 4) and
    `rope_parameters` (transformers 5)."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ConfigError(f"rope type {kind!r} is not supported (default, linear, llama3)")
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


def _opt_fields(raw: dict[str, Any]) -> dict[str, Any]:
    heads = raw["num_attention_heads"]
    hidden = raw["hidden_size"]
    return {
        "vocab_size": raw["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": raw["ffn_dim"],
        "num_layers": raw["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": raw.get("max_position_embeddings", 2048),
        "norm_eps": 1e-5,
        "tie_word_embeddings": raw.get("tie_word_embeddings", True),
        "attention_bias": raw.get("enable_bias", True),
        "mlp_bias": raw.get("enable_bias", True),
        "hidden_act": raw.get("activation_function", "relu"),
        "do_layer_norm_before": raw.get("do_layer_norm_before", True),
        "word_embed_proj_dim": raw.get("word_embed_proj_dim", hidden),
        "layer_norm_affine": raw.get("layer_norm_elementwise_affine", True),
        "final_layer_norm": raw.get("do_layer_norm_before", True)
        and not raw.get("_remove_final_layer_norm", False),
    }
