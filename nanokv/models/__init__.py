"""Model families. Every model exposes the same split interface, so the engine owns attention:

- `embed(input_ids (T,), positions (T,)) -> h (T, hidden)`
- `blocks[i].qkv(h, positions) -> q (T, H_q, D), k (T, H_kv, D), v (T, H_kv, D)` (keys after RoPE)
- `blocks[i].finish(h, attn_out (T, H_q * D)) -> h`, and `blocks[i].o_proj` (for value norms)
- `blocks[i].kv_dtype`: the dtype `qkv` hands q, k and v out in, and so the dtype attention and
  the KV cache run in (`set_kv_dtype`; default: the weights' dtype). `finish` takes the
  attention output in any dtype back to the hidden states'.
- `logits(h) -> (T, vocab) float32`
- `prepare_weights(layout)`: run once after loading (the loader does, with
  `WeightLayout.for_machine`): concatenates the weights that read the same input, lays every
  projection out for the machine's GEMV (or packs it for oneDNN: bf16 on a CPU with bf16
  instructions) and sets the LM head `logits` reads; the forward methods read those, and
  `layout` says which (models/linear.py)

Rows are tokens: a prefill chunk of one sequence, or one token of each sequence in decode.
"""

from __future__ import annotations

from torch import nn

from nanokv.config import ModelConfig
from nanokv.models.kv_dtype import kv_dtype, set_kv_dtype
from nanokv.models.llama import LlamaForCausalLM
from nanokv.models.opt import OPTForCausalLM

__all__ = ["MODEL_CLASSES", "build_model", "kv_dtype", "set_kv_dtype"]

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "opt": OPTForCausalLM,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """An uninitialised model of the config's family (build it under a `meta` device context)."""
    return MODEL_CLASSES[cfg.model_type](cfg)
