"""StreamingLLM (Xiao et al. 2023, mit-han-lab/streaming-llm): keep the attention sinks and the
most recent tokens. Default 4 sinks, as the reference `start_size=4`."""

from __future__ import annotations

import torch

from nanokv.arena import ArenaLayer
from nanokv.policies.base import Policy, PromptLayer


class StreamingLLM(Policy):
    name = "streaming"

    def prefill_scores(self, prompt: PromptLayer) -> torch.Tensor:
        recency = prompt.positions.float()  # later is better; sinks are protected by selection
        return recency.expand(prompt.k.shape[0], -1)

    def eviction_scores(self, layer: int, view: ArenaLayer) -> torch.Tensor:
        return view.pos.float()
