"""Tiny random Hugging Face checkpoints (made with transformers, the test-only reference)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 320
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def llama_config(**overrides):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    base.update(overrides)
    return LlamaConfig(**base)


def mistral_config(**overrides):
    from transformers import MistralConfig

    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        sliding_window=7, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    base.update(overrides)
    return MistralConfig(**base)


def opt_config(**overrides):
    from transformers import OPTConfig

    base = dict(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=48, do_layer_norm_before=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, dropout=0.0,
    )  # fmt: skip
    base.update(overrides)
    return OPTConfig(**base)


CONFIGS = {
    "llama": lambda: llama_config(),
    "llama3-rope": lambda: llama_config(
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),  # fmt: skip
    "llama-linear-rope": lambda: llama_config(
        rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True
    ),
    "mistral": lambda: mistral_config(),
    "opt": lambda: opt_config(),
    "opt-post-ln": lambda: opt_config(do_layer_norm_before=False, word_embed_proj_dim=64),
}


def make_hf_model(kind: str, seed: int = 0):
    """A transformers model of `kind` with random weights, eager attention, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = CONFIGS[kind]()
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # random init is tiny; widen it so that layers matter numerically
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.2)
    return model.float().eval()


def save_checkpoint(model, path: Path, *, shard_size: str | None = None) -> Path:
    """save_pretrained (safetensors, sharded when shard_size is given) + a tiny tokenizer."""
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    write_tokenizer(path)
    return path


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer with VOCAB entries and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, a kv cache test"] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
