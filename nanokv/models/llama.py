"""Llama and Mistral (same weights and layout; Mistral's sliding window lives in the attention,
which the engine runs). Pure modules: no cache and no attention inside, see models/__init__.py.

Parameters load under Hugging Face's names; `prepare_weights` (called by the loader) then
concatenates q/k/v and gate/up so that each block reads its weights in three GEMVs and the
output projection, not six and one, and sets the LM head that `logits` reads (fp32 logits in
every dtype, models/linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanokv.config import ModelConfig
from nanokv.kernels.cpu_linear import LayerFinish, finish_layer
from nanokv.models.kv_dtype import to_kv_dtype
from nanokv.models.linear import (
    AS_LOADED,
    Projection,
    WeightLayout,
    fuse_rows,
    head_logits,
    head_weight,
    lay_out,
    layer_finish,
    linear,
    packed,
)
from nanokv.models.norm import RMSNorm
from nanokv.models.rope import Rotary, RotatedHeads

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, "tanh")}


class LlamaAttentionWeights(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, q_size, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_size, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_size, bias=bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=bias)
        self.sizes = (q_size, kv_size, kv_size)
        self.qkv_weight: torch.Tensor | None = None  # ((H_q + 2 H_kv) D, hidden) once fused
        self.qkv_bias: torch.Tensor | None = None
        self.o_weight: torch.Tensor | None = None  # what `linear` reads for o_proj

    def fuse(self, layout: WeightLayout) -> None:
        layers = (self.q_proj, self.k_proj, self.v_proj)
        fused = fuse_rows(*layers, layout=layout, packed_before=self.qkv_weight)
        self.qkv_weight, self.qkv_bias = fused
        self.o_weight = lay_out(self.o_proj, layout)  # dense kept: value norms

    def project(
        self, x: torch.Tensor, norm: RMSNorm, rotary: Rotary, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> qk (T, (H_q + H_kv) D) of norm(x) after RoPE, v (T, H_kv D): views
        of one GEMV's output, q and k side by side so that RoPE rotates both in one pass."""
        q_size, kv_size, _ = self.sizes
        rope = RotatedHeads(rotary, positions, q_size + kv_size, rotary.head_dim)
        qkv = linear(x, self.qkv_weight, self.qkv_bias, norm=norm, rope=rope)
        return qkv.split((q_size + kv_size, kv_size), -1)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gate_up_weight: torch.Tensor | None = None  # (2 intermediate, hidden) once fused
        self.gate_up_bias: torch.Tensor | None = None
        self.down_weight: torch.Tensor | None = None  # what `linear` reads for down_proj

    def fuse(self, layout: WeightLayout) -> None:
        layers = (self.gate_proj, self.up_proj)
        fused = fuse_rows(*layers, layout=layout, packed_before=self.gate_up_weight)
        self.gate_up_weight, self.gate_up_bias = fused
        self.down_weight = lay_out(
            self.down_proj, layout, keep_dense=False, packed_before=self.down_weight
        )

    def forward(self, x: torch.Tensor, norm: RMSNorm, residual: torch.Tensor) -> torch.Tensor:
        """x (T, hidden) -> residual + MLP(norm(x)), (T, hidden)."""
        hidden = linear(x, self.gate_up_weight, self.gate_up_bias, norm=norm, glu=self.act)
        return linear(hidden, self.down_weight, self.down_proj.bias, residual=residual)


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
        self.kv_dtype: torch.dtype | None = None  # None: the weights' (models/__init__.py)
        self.fused_finish: LayerFinish | None = None  # `finish` in one C call, where it can be

    @property
    def o_proj(self) -> nn.Linear:
        return self.self_attn.o_proj

    def qkv(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """h: (T, hidden) -> q (T, H_q, D), k (T, H_kv, D) after RoPE, v (T, H_kv, D)."""
        cfg = self.cfg
        qk, v = self.self_attn.project(h, self.input_layernorm, self.rotary[0], positions)
        qk = qk.view(-1, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        q, k = qk.split((cfg.num_heads, cfg.num_kv_heads), dim=1)
        return to_kv_dtype(self.kv_dtype, q, k, v.view(-1, cfg.num_kv_heads, cfg.head_dim))

    def prepare_finish(self) -> None:
        """After the weights were laid out: `finish` as one call of the C kernel where every
        weight it reads is held in the kernel's blocks (models/linear.py, `layer_finish`)."""
        attn, mlp = self.self_attn, self.mlp
        self.fused_finish = layer_finish(
            Projection(attn.o_weight, attn.o_proj.bias),
            self.post_attention_layernorm,
            Projection(mlp.gate_up_weight, mlp.gate_up_bias),
            mlp.act,
            Projection(mlp.down_weight, mlp.down_proj.bias),
        )

    def finish(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """h: (T, hidden), attn_out: (T, H_q * D) -> the layer's output (T, hidden)."""
        if self.fused_finish is not None:
            return finish_layer(h, attn_out, self.fused_finish)
        attn = self.self_attn
        h = linear(attn_out.to(h.dtype), attn.o_weight, attn.o_proj.bias, residual=h)
        return self.mlp(h, self.post_attention_layernorm, residual=h)


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
        self.head: torch.Tensor | None = None  # (vocab, hidden), set by prepare_weights
        self.head_read: torch.Tensor | None = None  # its packed copy, where weights are packed
        self.layout = AS_LOADED  # set by prepare_weights

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def prepare_weights(self, layout: WeightLayout = AS_LOADED) -> None:
        """After loading (see above): fused q/k/v and gate/up, every projection and the LM head
        in `layout` (input-major where that pays or not, read from oneDNN-packed copies or not;
        models/linear.py); callable again to switch."""
        for block in self.blocks:
            block.self_attn.fuse(layout)
            block.mlp.fuse(layout)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.prepare()
        for block in self.blocks:
            block.prepare_finish()
        tied = self.cfg.tie_word_embeddings
        head = self.model.embed_tokens if tied else self.lm_head
        self.head = head_weight(lay_out(head, layout.unpacked))
        self.head_read = packed(self.head, layout.packing) if layout.pack else None
        self.layout = layout

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: (T, hidden) -> (T, vocab) float32."""
        return head_logits(self.model.norm(h), self.head, self.head_read)
