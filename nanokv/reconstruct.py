"""AUV's reconstructed K/V (its eqs. 7-8): one extra slot per kv head holds the mean of every
evicted key (value), weighted by the evicted tokens' aggregated attention scores, and is attended
like any token. The slot is marked with position -2 and its `score` holds the running weight sum
SES, so folding more victims in later is exact:
``rcs' = (rcs * SES + sum_i w_i kv_i) / (SES + sum_i w_i)``.

These functions compute the slot's new contents and return them; the eviction stage
(`eviction.py`) writes them into the arena. Nothing here writes the arena."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.arena import ArenaLayer

RECONSTRUCTED_POS = -2


@dataclass(frozen=True)
class ReconstructedSlot:
    """New contents of each kv head's reconstructed slot, for the eviction stage to write.

    k, v: (..., H_kv, D); weight: (..., H_kv) the running weight sum SES, kept as the slot's
    score; slot: (..., H_kv) the slot each head's lives in, or None for a new slot written after
    the head's kept tokens (prefill). Its position is always `RECONSTRUCTED_POS`."""

    k: torch.Tensor
    v: torch.Tensor
    weight: torch.Tensor
    slot: torch.Tensor | None = None
    pos: int = RECONSTRUCTED_POS


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
    k: torch.Tensor, v: torch.Tensor, evicted_weights: torch.Tensor
) -> ReconstructedSlot:
    """The reconstructed slot of one layer's prompt: the weighted mean of what it dropped.

    k, v: (H_kv, n, D) the layer's prompt; evicted_weights: (H_kv, n), 0 for kept tokens.
    Returns float32 k, v (H_kv, D) and the weight sum (H_kv,), for a new slot (slot None).
    """
    kv_heads = k.shape[0]
    zero = torch.zeros(kv_heads, device=k.device)
    prior = torch.zeros_like(k[:, 0], dtype=torch.float32)
    rcs_k, total = weighted_mean(k, evicted_weights, prior, zero)
    rcs_v, _ = weighted_mean(v, evicted_weights, prior, zero)
    return ReconstructedSlot(rcs_k, rcs_v, total)


def fold_victims(
    view: ArenaLayer, victims: torch.Tensor, evicting: torch.Tensor
) -> ReconstructedSlot | None:
    """The reconstructed slots of one layer after folding in the victims (B, H_kv, W) of the
    evicting sequences (B,), weighted by their scores. Returns k, v (B, H_kv, D) in the arena's
    dtype, the weight sums (B, H_kv) and each head's slot (B, H_kv); heads that do not evict or
    hold no such slot get their current contents back (writing them is a no-op). None when no
    head has anything to fold."""
    pos, score = view.pos, view.score  # (B, H_kv, C)
    is_rcs = pos == RECONSTRUCTED_POS
    has_rcs = is_rcs.any(dim=-1) & evicting.view(-1, 1)  # (B, H_kv)
    if not bool(has_rcs.any()):
        return None
    rcs_slot = is_rcs.int().argmax(dim=-1, keepdim=True)  # (B, H_kv, 1)
    head_dim = view.k.shape[-1]
    weights = score.gather(-1, victims)  # (B, H_kv, W)
    prior_weight = score.gather(-1, rcs_slot).squeeze(-1)
    folded = []
    for buffer in (view.k, view.v):
        gathered = buffer.gather(2, victims.unsqueeze(-1).expand(-1, -1, -1, head_dim))
        prior = buffer.gather(2, rcs_slot.unsqueeze(-1).expand(-1, -1, -1, head_dim))
        mean, total = weighted_mean(gathered, weights, prior.squeeze(2), prior_weight)
        folded.append(torch.where(has_rcs.unsqueeze(-1), mean.to(buffer.dtype), prior.squeeze(2)))
    new_weight = torch.where(has_rcs, total, prior_weight)
    return ReconstructedSlot(folded[0], folded[1], new_weight, rcs_slot.squeeze(-1))
