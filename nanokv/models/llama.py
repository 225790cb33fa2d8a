"""Llama and Mistral (same weights and layout; Mistral's sliding window lives in the attention,
which the engine runs). Pure modules: no cache and no attention inside, see models/__init__.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanokv.config import ModelConfig
from nanokv.models.rope import Rotary

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, "tanh")}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LlamaAttentionWeights(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, q_size, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_size, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_size, bias=bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=bias)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """One decoder layer split around its attention: `qkv` before, `finish` after."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary) -> None:
        super().__init__()
        self.cfg = cfg
        self.rotary = [rotary]  # shared, kept out of this module's parameters
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttentionWeights(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    @property
    def o_proj(self) -> nn.Linear:
        return self.self_attn.o_proj

    def qkv(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """h: (T, hidden) -> q (T, H_q, D), k (T, H_kv, D) after RoPE, v (T, H_kv, D)."""
        cfg, attn = self.cfg, self.self_attn
        x = self.input_layernorm(h)
        q = attn.q_proj(x).view(-1, cfg.num_heads, cfg.head_dim)
        k = attn.k_proj(x).view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = attn.v_proj(x).view(-1, cfg.num_kv_heads, cfg.head_dim)
        cos, sin = self.rotary[0].cos_sin(positions, q.dtype)
        return Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin), v

    def finish(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """h: (T, hidden), attn_out: (T, H_q * D) -> the layer's output (T, hidden)."""
        h = h + self.self_attn.o_proj(attn_out)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.rotary = Rotary(cfg.rope, cfg.head_dim)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(cfg, self.rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class LlamaForCausalLM(nn.Module):
    """Parameter names mirror Hugging Face's, so a checkpoint loads without renaming."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaBackbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: (T, hidden) -> (T, vocab) float32."""
        h = self.model.norm(h)
        weight = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else None
        head = weight if weight is not None else self.lm_head.weight
        return F.linear(h, head).float()
