"""Quest (Tang et al. 2024, arXiv 2406.10774; mit-han-lab/Quest): query-aware page sparsity.

Keys are grouped in pages of 16 slots; per page and kv head the element-wise min and max key are
kept up to date. Each decode step ranks pages by the upper bound ``sum_i max(q_i kmax_i,
q_i kmin_i)`` of any key's logit in the page, and attention reads only the top pages that fit the
token budget (plus the page being written). The first two layers stay dense, as in the paper.
Quest reduces the bytes read per step, not the memory held: it composes with any eviction policy
on the same arena. On CPU the selected pages are gathered and attended alone
(`sparse_decode_attention_torch`), so the K/V read per step is the read budget's. `oracle=True`
ranks pages by their true attention mass instead (a diagnostic that separates the bound's
ranking from the page granularity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.arena import ArenaLayer, KVArena
from nanokv.budget import Budget
from nanokv.kernels.cpu_attention import cpu_merge_page_bounds, cpu_quest_attention
from nanokv.kernels.decode_attention import Emitted, decode_attention_torch
from nanokv.kernels.quest import (
    PAGE_SIZE,
    merge_page_bounds,
    page_bounds,
    page_upper_bound,
    select_pages,
    sparse_decode_attention,
)


@dataclass(frozen=True)
class QuestOptions:
    budget: Budget  # tokens read per step and kv head (a fraction is of the prompt length)
    page_size: int = PAGE_SIZE
    dense_layers: int = 2
    oracle: bool = False


class QuestSparsity:
    """Page bounds per layer, refreshed on writes and evictions; sparse attention per step.
    One instance per generate call."""

    def __init__(self, options: QuestOptions, num_layers: int, prompt_length: int) -> None:
        self.options = options
        budget = options.budget
        read = budget.tokens(prompt_length) if budget.is_fraction else int(budget.value)
        self.token_budget = read
        self.bounds: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self._pages = torch.zeros(2, dtype=torch.long)  # read, held: summed on the device

    @property
    def pages_read(self) -> int:
        """Pages read by the sparse layers' decode steps so far (all sequences, kv heads)."""
        return int(self._pages[0])

    @property
    def pages_held(self) -> int:
        """Valid pages those steps could have read."""
        return int(self._pages[1])

    def is_sparse(self, layer: int) -> bool:
        return layer >= self.options.dense_layers

    def refresh(self, arena: KVArena, layer: int) -> None:
        """Recomputes a layer's page bounds from the arena (after prefill or an eviction)."""
        if self.is_sparse(layer):
            kmin, kmax = page_bounds(arena.k[layer], arena.lengths[layer], self.options.page_size)
            self.bounds[layer] = (kmin.float(), kmax.float())  # ranked in fp32 every step

    def written(self, arena: KVArena, layer: int, slots: torch.Tensor) -> None:
        """Folds the keys a decode step appended at `slots` (B, H_kv) into their pages' bounds
        (an eviction moves keys and calls `refresh` instead)."""
        if not self.is_sparse(layer):
            return
        if self.bounds[layer] is None:
            self.refresh(arena, layer)
            return
        kmin, kmax = self.bounds[layer]
        if cpu_merge_page_bounds(arena.k[layer], slots, (kmin, kmax), self.options.page_size):
            return
        seq = torch.arange(slots.shape[0], device=slots.device).unsqueeze(1)
        heads = torch.arange(slots.shape[1], device=slots.device)
        k_new = arena.k[layer][seq, heads, slots.long()]  # (B, H_kv, D)
        merge_page_bounds(kmin, kmax, k_new, slots, self.options.page_size)

    def attend(
        self, layer: int, q: torch.Tensor, arena: KVArena, **attention
    ) -> tuple[torch.Tensor, Emitted | None]:
        """Attention of q (B, H_q, D) over the selected pages of this layer."""
        view = arena.layer(layer)
        out = self._attend_in_c(layer, q, view, attention)
        if out is not None:
            return out, None
        page_scores = self._page_scores(layer, q, arena, attention)
        table = select_pages(page_scores, view.lengths, self.token_budget, self.options.page_size)
        held = (view.lengths + self.options.page_size - 1) // self.options.page_size
        counts = torch.stack(((table >= 0).sum(), held.sum()))
        self._pages = self._pages.to(counts.device) + counts  # no wait on the device
        return sparse_decode_attention(
            q, view.k, view.v, view.lengths, table, page_size=self.options.page_size, **attention
        )

    def _attend_in_c(
        self, layer: int, q: torch.Tensor, view: ArenaLayer, attention: dict
    ) -> torch.Tensor | None:
        """The whole step in the C kernel (`cpu_quest_attention`) on a CPU, where it applies:
        no emission, no sliding window, the bound's ranking (not the oracle's). None else."""
        if (
            q.device.type != "cpu"
            or attention["emit"]
            or attention["sliding_window"] is not None
            or self.options.oracle
        ):
            return None
        page_size = self.options.page_size
        kmin, kmax = self.bounds[layer]
        keep = max(1, min(self.token_budget // page_size, kmin.shape[2]))
        self._pages = self._pages.cpu()
        q_kv = q if q.dtype == view.k.dtype else q.to(view.k.dtype)
        out = cpu_quest_attention(
            q_kv, view.k, view.v, view.lengths, (kmin, kmax), keep, page_size,
            attention["scale"], self._pages,
        )  # fmt: skip
        if out is None:
            return None
        return out if out.dtype == q.dtype else out.to(q.dtype)

    def _page_scores(
        self, layer: int, q: torch.Tensor, arena: KVArena, attention: dict
    ) -> torch.Tensor:
        if not self.options.oracle:
            kmin, kmax = self.bounds[layer]
            return page_upper_bound(q, kmin, kmax, attention["scale"])
        view = arena.layer(layer)
        dense = {
            key: value for key, value in attention.items() if key not in ("emit", "value_norms")
        }
        _, emitted = decode_attention_torch(q, view.k, view.v, view.lengths, emit=True, **dense)
        mass = emitted.mass  # (B, H_kv, C)
        pages = -(-mass.shape[-1] // self.options.page_size)
        padded = torch.nn.functional.pad(mass, (0, pages * self.options.page_size - mass.shape[-1]))
        per_page = padded.view(*mass.shape[:2], pages, self.options.page_size).sum(-1)
        group = q.shape[1] // mass.shape[1]
        return per_page.repeat_interleave(group, dim=1)  # (B, H_q, P)
