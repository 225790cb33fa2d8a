"""How a budget is split between layers and kv heads.

- `uniform`: every (layer, kv head) keeps the same count (SnapKV, kvpress ScorerPress).
- `pyramid`: PyramidKV's linear schedule (Cai et al. 2024, `pyramidkv_utils.py`, beta = 20): the
  first layer keeps the most, the last the least, the mean is the uniform budget.
- `layer`: one top-k over the kv heads of each layer: a layer keeps heads x budget tokens,
  distributed by score.
- `global`: one top-k over every layer and head (LaProx's model-wide selection).
- `layerwise`: one top-k over layer widths: each layer gets its own count, chosen model-wide by
  the summed scores of its heads, and every head of the layer keeps that many (per-layer budgets
  as SqueezeAttention and CAKE set them, from the policy's scores): a layer's rectangle of the
  arena then holds exactly what its heads keep, which `global` cannot promise.

`layer` and `global` take an optional per-head floor (AdaKV's safeguard): every head keeps at least
`min_head_share` of the uniform budget. Every head is capped at the arena's kept capacity.
"""

from __future__ import annotations

import torch

from nanokv.policies.selection import keep_order

ALLOCATIONS = ("uniform", "pyramid", "layer", "global", "layerwise")
MODEL_WIDE = ("global", "layerwise")  # allocations that cut once prefill has seen every layer
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
    _, row_rank = _keep_places(ranked, rank)  # (R, n)
    n_protected = (rank >= 0).sum(dim=-1, keepdim=True).clamp(max=protect_limit)
    guaranteed = valid & (row_rank < torch.clamp(n_protected, min=floor, max=cap))
    allowed = valid & (row_rank < cap) & ~guaranteed
    remaining = max(total - int(guaranteed.sum()), 0)
    chosen = _best(ranked.masked_fill(~allowed, float("-inf")).flatten(), remaining)
    keep = guaranteed.flatten().clone()
    keep[chosen] = True
    return keep.view(rows, n)


def select_layer_widths(
    scores: torch.Tensor,
    protected_rank: torch.Tensor,
    valid: torch.Tensor,
    total: int,
    *,
    floor: int = 0,
    cap: int | None = None,
    protect_limit: int | None = None,
) -> torch.Tensor:
    """Bool (L, H, n): which entries to keep when every head of a layer keeps the same count
    w_l and the L layers share one budget of sum(w_l) = total / H.

    scores, protected_rank, valid: (L, H, n). A head's entries are taken in keep order
    (protected first, then by score); widening layer l by one slot gains the sum over its heads
    of the next entries' scores (>= 0), which never grows with the width, so the best widths
    are the top gains over all layers. Every layer first takes its protected entries (up to
    `protect_limit`, at least `floor`); no layer is wider than `cap`."""
    layers, heads, n = scores.shape
    cap = n if cap is None else min(cap, n)
    ranked = scores.float().masked_fill(~valid, 0.0).flatten(0, 1)
    rank = torch.where(valid, protected_rank, -1).flatten(0, 1)
    order, position = _keep_places(ranked.masked_fill(~valid.flatten(0, 1), float("-inf")), rank)
    in_order = ranked.gather(-1, order).view(layers, heads, n)  # each head's scores, kept first
    gains = in_order.sum(dim=1)[:, :cap]  # (L, cap): what each layer's next slot adds
    protected = (rank >= 0).view(layers, heads, n).sum(dim=-1).amax(dim=1)  # (L,)
    if protect_limit is not None:
        protected = protected.clamp(max=protect_limit)
    guaranteed = torch.clamp(protected, min=floor, max=cap)  # (L,)
    widths = guaranteed.clone()
    remaining = max(total // heads - int(guaranteed.sum()), 0)
    slots = torch.arange(cap, device=scores.device)
    open_ = slots.unsqueeze(0) >= guaranteed.unsqueeze(1)  # (L, cap): widths still to win
    chosen = _best(gains.masked_fill(~open_, float("-inf")).flatten(), remaining)
    widths += torch.bincount(chosen // cap, minlength=layers)
    keep = position.view(layers, heads, n) < widths.view(-1, 1, 1)
    return keep & valid


def _keep_places(ranked: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, n) each row's indices in keep order (`keep_order`), and each entry's place in it."""
    order = keep_order(ranked, rank)
    places = torch.arange(order.shape[-1], device=order.device).expand_as(order).contiguous()
    return order, torch.empty_like(order).scatter_(-1, order, places)


def _best(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest finite entries of `flat`, ties by index."""
    chosen = torch.argsort(-flat, stable=True)[:count]
    return chosen[torch.isfinite(flat[chosen])]


def kept_slots(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, m) kept indices (ascending, padded with the row's first kept index) and (R,) counts."""
    counts = keep.sum(dim=-1)
    width = max(int(counts.max()), 1)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :width]
    valid = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(valid, order, order[:, :1]), counts
