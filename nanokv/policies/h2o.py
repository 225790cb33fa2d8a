"""H2O (Zhang et al. 2023, FMInference/H2O `H2OKVCache_LayerWise`): accumulated attention, the
"heavy hitters". Prompt score = column sums of the causal attention over all prompt queries
(computed in query chunks, never an n x n matrix), summed over each GQA group; every decode step
adds the new query's attention. Sinks and the recent window are kept."""

from __future__ import annotations

import torch

from nanokv.arena import ArenaLayer
from nanokv.kernels.decode_attention import Emitted
from nanokv.policies.base import Policy, PromptLayer, prompt_column_statistics


class H2O(Policy):
    name = "h2o"
    needs_all_queries = True
    needs_decode_mass = True
    decode_statistics = "summed"

    def prefill_scores(self, prompt: PromptLayer) -> torch.Tensor:
        stats = prompt_column_statistics(prompt)
        kv_heads, n = prompt.k.shape[0], prompt.k.shape[1]
        scores = stats.sums.view(kv_heads, -1, n).sum(dim=1)  # (H_kv, n)
        return self.smooth(scores)

    def observe_decode(
        self, layer: int, view: ArenaLayer, emitted: Emitted | None
    ) -> dict[str, torch.Tensor]:
        return {"score": view.score + emitted.mass}  # accumulated attention
