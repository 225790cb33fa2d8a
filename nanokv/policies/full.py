"""The full cache: nothing is evicted. The reference every other policy is measured against."""

from __future__ import annotations

import torch

from nanokv.policies.base import Policy, PromptLayer


class FullCache(Policy):
    name = "full"

    def arena_capacity(self, prompt_length: int, max_new_tokens: int) -> int:
        return prompt_length + max_new_tokens

    def prefill_keep(self, prompt: PromptLayer) -> torch.Tensor | None:
        return None
