"""AUV's reconstructed K/V (its eqs. 7-8): one extra slot per kv head holds the mean of every
evicted key (value), weighted by the evicted tokens' aggregated attention scores, and is attended
like any token. The slot is marked with position -2 and its `score` holds the running weight sum
SES, so folding more victims in later is exact:
``rcs' = (rcs * SES + sum_i w_i kv_i) / (SES + sum_i w_i)``."""

from __future__ import annotations

import torch

from nanokv.arena import KVArena

RECONSTRUCTED_POS = -2


def weighted_mean(
    vectors: torch.Tensor, weights: torch.Tensor, prior: torch.Tensor, prior_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folds vectors (..., m, D) with weights (..., m) into prior (..., D) of weight (...,).
    Returns the new mean and weight; with zero total weight the plain mean is used."""
    weights = weights.float().clamp_min(0)
    total = prior_weight + weights.sum(dim=-1)
    summed = prior.float() * prior_weight.unsqueeze(-1) + (
        weights.unsqueeze(-1) * vectors.float()
    ).sum(-2)
    plain = vectors.float().mean(dim=-2)
    mean = torch.where(
        total.unsqueeze(-1) > 0, summed / total.clamp_min(1e-30).unsqueeze(-1), plain
    )
    return mean, total


def reconstruct_prefill(
    arena: KVArena,
    layer: int,
    seq: int,
    k: torch.Tensor,
    v: torch.Tensor,
    evicted_weights: torch.Tensor,
) -> None:
    """Appends the reconstructed slot after each head's kept tokens.

    k, v: (H_kv, n, D) the layer's prompt; evicted_weights: (H_kv, n), 0 for kept tokens.
    """
    kv_heads = k.shape[0]
    zero = torch.zeros(kv_heads, device=k.device)
    prior = torch.zeros_like(k[:, 0], dtype=torch.float32)
    rcs_k, total = weighted_mean(k, evicted_weights, prior, zero)
    rcs_v, _ = weighted_mean(v, evicted_weights, prior, zero)
    slot = arena.lengths[layer, seq].long()  # (H_kv,)
    arena.write_slot(layer, seq, slot, rcs_k, rcs_v, RECONSTRUCTED_POS)
    arena.score[layer, seq, torch.arange(kv_heads), slot] = total
    arena.set_lengths(layer, (slot + 1).view(1, -1), seq=seq)


def fold_victims(arena: KVArena, layer: int, victims: torch.Tensor, evicting: torch.Tensor) -> None:
    """Folds the victims (B, H_kv, W) of the evicting sequences (B,) into each head's
    reconstructed slot, weighted by their scores. Heads without such a slot are left alone."""
    pos, score = arena.pos[layer], arena.score[layer]  # (B, H_kv, C)
    is_rcs = pos == RECONSTRUCTED_POS
    has_rcs = is_rcs.any(dim=-1) & evicting.view(-1, 1)  # (B, H_kv)
    if not bool(has_rcs.any()):
        return
    rcs_slot = is_rcs.int().argmax(dim=-1, keepdim=True)  # (B, H_kv, 1)
    head_dim = arena.k.shape[-1]
    weights = score.gather(-1, victims)  # (B, H_kv, W)
    prior_weight = score.gather(-1, rcs_slot).squeeze(-1)
    for buffer in (arena.k, arena.v):
        gathered = buffer[layer].gather(2, victims.unsqueeze(-1).expand(-1, -1, -1, head_dim))
        prior = buffer[layer].gather(2, rcs_slot.unsqueeze(-1).expand(-1, -1, -1, head_dim))
        mean, total = weighted_mean(gathered, weights, prior.squeeze(2), prior_weight)
        updated = torch.where(has_rcs.unsqueeze(-1), mean.to(buffer.dtype), prior.squeeze(2))
        buffer[layer].scatter_(
            2, rcs_slot.unsqueeze(-1).expand(-1, -1, 1, head_dim), updated.unsqueeze(2)
        )
    new_weight = torch.where(has_rcs, total, prior_weight)
    score.scatter_(-1, rcs_slot, new_weight.unsqueeze(-1))
