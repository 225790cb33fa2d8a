"""OPT: learned positions (offset 2), LayerNorm before or after each sub-layer, ReLU MLP, biases,
optional word_embed_proj_dim projections. Pure modules: the engine runs the attention.
`prepare_weights` (called by the loader) concatenates q/k/v into one weight and sets the LM head
that `logits` reads (fp32 logits in every dtype, models/linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanokv.config import ModelConfig
from nanokv.models.kv_dtype import to_kv_dtype
from nanokv.models.linear import (
    AS_LOADED,
    WeightLayout,
    fuse_rows,
    head_logits,
    head_weight,
    lay_out,
    linear,
    packed,
)

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (fairseq's padding legacy)
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class OPTAttentionWeights(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        size, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(size, size, bias=bias)
        self.k_proj = nn.Linear(size, size, bias=bias)
        self.v_proj = nn.Linear(size, size, bias=bias)
        self.out_proj = nn.Linear(size, size, bias=bias)
        self.qkv_weight: torch.Tensor | None = None  # (3 hidden, hidden) once fused
        self.qkv_bias: torch.Tensor | None = None
        self.out_weight: torch.Tensor | None = None  # what `linear` reads for out_proj

    def fuse(self, layout: WeightLayout) -> None:
        layers = (self.q_proj, self.k_proj, self.v_proj)
        fused = fuse_rows(*layers, layout=layout, packed_before=self.qkv_weight)
        self.qkv_weight, self.qkv_bias = fused
        self.out_weight = lay_out(self.out_proj, layout)  # dense kept: value norms


class OPTBlock(nn.Module):
    """One decoder layer split around its attention: `qkv` before, `finish` after."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        affine = cfg.layer_norm_affine
        self.self_attn = OPTAttentionWeights(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.kv_dtype: torch.dtype | None = None  # None: the weights' (models/__init__.py)
        self.fc_weights: tuple[torch.Tensor, torch.Tensor] | None = None  # what `linear` reads

    @property
    def o_proj(self) -> nn.Linear:
        return self.self_attn.out_proj

    def qkv(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """h: (T, hidden) -> q, k, v each (T, H, D); OPT has no rotary embedding."""
        cfg, attn = self.cfg, self.self_attn
        x = self.self_attn_layer_norm(h) if cfg.do_layer_norm_before else h
        shape = (-1, cfg.num_heads, cfg.head_dim)
        q, k, v = linear(x, attn.qkv_weight, attn.qkv_bias).chunk(3, dim=-1)  # (T, hidden) each
        return to_kv_dtype(self.kv_dtype, q.view(shape), k.view(shape), v.view(shape))

    def finish(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """h: (T, hidden), attn_out: (T, H * D) -> the layer's output (T, hidden)."""
        pre_norm, attn = self.cfg.do_layer_norm_before, self.self_attn
        h = h + linear(attn_out.to(h.dtype), attn.out_weight, attn.out_proj.bias)
        if not pre_norm:
            h = self.self_attn_layer_norm(h)
        x = self.final_layer_norm(h) if pre_norm else h
        fc1_weight, fc2_weight = self.fc_weights
        x = self.act(linear(x, fc1_weight, self.fc1.bias))
        h = h + linear(x, fc2_weight, self.fc2.bias)
        return h if pre_norm else self.final_layer_norm(h)


class OPTDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        proj_dim = cfg.word_embed_proj_dim or cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, proj_dim)
        self.embed_positions = nn.Embedding(
            cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size
        )
        if proj_dim != cfg.hidden_size:
            self.project_in = nn.Linear(proj_dim, cfg.hidden_size, bias=False)
            self.project_out = nn.Linear(cfg.hidden_size, proj_dim, bias=False)
        if cfg.final_layer_norm:
            affine = cfg.layer_norm_affine
            self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)
        self.layers = nn.ModuleList(OPTBlock(cfg) for _ in range(cfg.num_layers))


class OPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(cfg)


class OPTForCausalLM(nn.Module):
    """Parameter names mirror Hugging Face's, so a checkpoint loads without renaming."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = OPTModel(cfg)
        if not cfg.tie_word_embeddings:
            proj_dim = cfg.word_embed_proj_dim or cfg.hidden_size
            self.lm_head = nn.Linear(proj_dim, cfg.vocab_size, bias=False)
        self.head: torch.Tensor | None = None  # (vocab, proj_dim), set by prepare_weights
        self.head_read: torch.Tensor | None = None  # its packed copy, where weights are packed
        self.project_out_read: torch.Tensor | None = None  # what `linear` reads for project_out
        self.layout = AS_LOADED  # set by prepare_weights

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.decoder.layers

    def prepare_weights(self, layout: WeightLayout = AS_LOADED) -> None:
        """After loading (see above): fused q/k/v, every projection and the LM head in `layout`
        (input-major where that pays or not, read from oneDNN-packed copies or not;
        models/linear.py); callable again to switch."""
        decoder = self.model.decoder
        for block in self.blocks:
            block.self_attn.fuse(layout)
            before = block.fc_weights or (None, None)
            block.fc_weights = tuple(
                lay_out(fc, layout, keep_dense=False, packed_before=packed_fc)
                for fc, packed_fc in zip((block.fc1, block.fc2), before, strict=True)
            )
        if hasattr(decoder, "project_in"):  # project_in runs as a module in `embed`
            lay_out(decoder.project_in, layout.unpacked)
            self.project_out_read = lay_out(
                decoder.project_out, layout, keep_dense=False, packed_before=self.project_out_read
            )
        head = decoder.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head
        self.head = head_weight(lay_out(head, layout.unpacked))
        self.head_read = packed(self.head, layout.packing) if layout.pack else None
        self.layout = layout

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        decoder = self.model.decoder
        h = decoder.embed_tokens(input_ids)
        if hasattr(decoder, "project_in"):
            h = decoder.project_in(h)
        return h + decoder.embed_positions(positions + POSITION_OFFSET)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        decoder = self.model.decoder
        if hasattr(decoder, "final_layer_norm"):
            h = decoder.final_layer_norm(h)
        if hasattr(decoder, "project_out"):
            h = linear(h, self.project_out_read, None)
        return head_logits(h, self.head, self.head_read)
