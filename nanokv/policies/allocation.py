"""How a budget is split between layers and kv heads.

- `uniform`: every (layer, kv head) keeps the same count (SnapKV, kvpress ScorerPress).
- `pyramid`: PyramidKV's linear schedule (Cai et al. 2024, `pyramidkv_utils.py`, beta = 20): the
  first layer keeps the most, the last the least, the mean is the uniform budget.
- `layer`: one top-k over the kv heads of each layer: a layer keeps heads x budget tokens,
  distributed by score.
- `global`: one top-k over every layer and head (LaProx's model-wide selection).

`layer` and `global` take an optional per-head floor (AdaKV's safeguard): every head keeps at least
`min_head_share` of the uniform budget. Every head is capped at the arena's kept capacity.
"""

from __future__ import annotations

import torch

from nanokv.policies.selection import keep_order

ALLOCATIONS = ("uniform", "pyramid", "layer", "global")
PYRAMID_BETA = 20


def pyramid_budgets(mean: int, num_layers: int, protected: int = 0) -> list[int]:
    """Per-layer counts, linearly decreasing, summing to num_layers * mean (PyramidKV).

    `protected` tokens (sinks + window) are kept in every layer and excluded from the slope.
    """
    if num_layers == 1:
        return [mean]
    free = max(mean - protected, 0)
    low = free / PYRAMID_BETA
    high = 2 * free - low
    step = (high - low) / (num_layers - 1)
    budgets = [protected + int(high - layer * step) for layer in range(num_layers)]
    budgets[0] += num_layers * mean - sum(budgets)  # rounding remainder to the first layer
    return budgets


def select_across_rows(
    scores: torch.Tensor,
    protected_rank: torch.Tensor,
    valid: torch.Tensor,
    total: int,
    *,
    floor: int = 0,
    cap: int | None = None,
    protect_limit: int | None = None,
) -> torch.Tensor:
    """Bool (R, n): which entries to keep when R rows (heads) share one budget of `total`.

    scores, protected_rank, valid: (R, n); protected_rank >= 0 marks protected entries and their
    order (selection.protection_rank). Each row first keeps up to `protect_limit` protected
    entries, topped up with its best others to at least `floor`; then the best remaining entries
    of all rows compete together; a row never keeps more than `cap`. Ties break by row, then
    position.
    """
    rows, n = scores.shape
    cap = n if cap is None else cap
    protect_limit = n if protect_limit is None else protect_limit
    ranked = scores.float().masked_fill(~valid, torch.finfo(torch.float32).min)
    rank = torch.where(valid, protected_rank, -1)
    row_order = keep_order(ranked, rank)  # (R, n)
    row_rank = torch.empty_like(row_order)
    row_rank.scatter_(-1, row_order, torch.arange(n).expand(rows, n).contiguous())
    n_protected = (rank >= 0).sum(dim=-1, keepdim=True).clamp(max=protect_limit)
    guaranteed = valid & (row_rank < torch.clamp(n_protected, min=floor, max=cap))
    allowed = valid & (row_rank < cap) & ~guaranteed
    remaining = max(total - int(guaranteed.sum()), 0)
    flat = ranked.masked_fill(~allowed, float("-inf")).flatten()
    chosen = torch.argsort(-flat, stable=True)[:remaining]
    chosen = chosen[torch.isfinite(flat[chosen])]
    keep = guaranteed.flatten().clone()
    keep[chosen] = True
    return keep.view(rows, n)


def kept_slots(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, m) kept indices (ascending, padded with the row's first kept index) and (R,) counts."""
    counts = keep.sum(dim=-1)
    width = max(int(counts.max()), 1)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :width]
    valid = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(valid, order, order[:, :1]), counts
