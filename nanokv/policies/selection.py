"""Scores -> kept slots, shared by every score-based policy.

Protected tokens come first (attention sinks, then the observation window, most recent first),
the rest of the budget goes to the highest scores; ties break by position (the earlier token
wins), so the same input always keeps the same tokens. Selection is per kv head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool (H, n) scores along tokens with an odd `kernel` (SnapKV keeps neighbourhoods)."""
    if kernel <= 1:
        return scores
    return F.max_pool1d(scores.unsqueeze(0), kernel, stride=1, padding=kernel // 2).squeeze(0)


def chunk_scores(scores: torch.Tensor, chunk: int) -> torch.Tensor:
    """Every token gets the mean score of its chunk of `chunk` consecutive tokens (from 0)."""
    if chunk <= 1:
        return scores
    heads, n = scores.shape
    padded = F.pad(scores, (0, -n % chunk), value=float("nan"))
    means = padded.view(heads, -1, chunk).nanmean(dim=-1)  # (H, ceil(n / chunk))
    return means.repeat_interleave(chunk, dim=-1)[:, :n]


def protection_rank(positions: torch.Tensor, n: int, sinks: int, window: int) -> torch.Tensor:
    """Int64 like positions: the order in which protected tokens are kept (sinks by position,
    then the last `window` prompt tokens, most recent first), -1 for unprotected tokens."""
    positions = positions.long()
    rank = torch.full_like(positions, -1)
    in_window = (positions >= n - window) & (positions >= 0)
    rank = torch.where(in_window, sinks + (n - 1 - positions), rank)
    return torch.where((positions < sinks) & (positions >= 0), positions, rank)


def keep_order(scores: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """(R, n) indices of each row in keep order: protected tokens by rank, then descending
    score, ties by position."""
    by_score = torch.argsort(-scores.float(), dim=-1, stable=True)
    primary = torch.where(rank >= 0, rank, scores.shape[-1] + 1).expand_as(scores)
    by_rank = torch.argsort(primary.gather(-1, by_score), dim=-1, stable=True)
    return by_score.gather(-1, by_rank)


def select_prompt_tokens(
    scores: torch.Tensor, count: int, *, sinks: int, window: int
) -> torch.Tensor:
    """(H, count) indices into n prompt tokens, ascending, for (H, n) scores.

    Kept: the first `sinks` tokens, then the last `window` tokens (most recent first), then the
    highest-scoring rest, until `count` are chosen.
    """
    n = scores.shape[-1]
    rank = protection_rank(torch.arange(n, device=scores.device), n, sinks, window)
    chosen = keep_order(scores, rank)[:, : min(count, n)]
    return chosen.sort(dim=-1).values


def select_victims(
    scores: torch.Tensor, positions: torch.Tensor, candidates: torch.Tensor, count: int, sinks: int
) -> torch.Tensor:
    """(B, H, count) slots to free: the lowest-scoring candidate slots that are not sinks.

    scores, positions: (B, H, C); candidates: (B, H, C) bool, at least `count` true per row.
    Sinks are only taken when no other candidate is left.
    """
    ranked = scores.float().masked_fill(~candidates, float("inf"))
    is_sink = positions < sinks
    ranked = torch.where(is_sink & candidates, torch.finfo(torch.float32).max, ranked)
    return torch.argsort(ranked, dim=-1, stable=True)[..., :count]
