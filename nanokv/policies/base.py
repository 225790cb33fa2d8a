"""What the engine asks of an eviction policy. Policies produce decisions from scores; only the
engine and the arena move data, and policies know nothing of the model's architecture."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptLayer:
    """One layer's prompt K/V of one sequence, as the policy sees it after that layer ran."""

    layer: int
    k: torch.Tensor  # (H_kv, n, D), after RoPE
    v: torch.Tensor  # (H_kv, n, D)
    positions: torch.Tensor  # (n,)
    window_queries: torch.Tensor  # (H_q, w, D), the last w prompt queries, after RoPE


class Policy:
    """Base policy: sizes the arena and chooses which prompt tokens each kv head keeps."""

    name = "base"
    observation_window = 32

    def arena_capacity(self, prompt_length: int, max_new_tokens: int) -> int:
        """Slots per (layer, seq, kv head) for the longest prompt of a batch."""
        raise NotImplementedError

    def prefill_keep(self, prompt: PromptLayer) -> torch.Tensor | None:
        """(H_kv, m) indices of the prompt tokens to keep, or None to keep them all."""
        raise NotImplementedError
