"""SamplingParams and the token sampler: greedy, temperature, top-k, top-p, seeded per sequence."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 is greedy (what eviction studies use)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens must be a positive integer, got {self.max_new_tokens}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Samples one token per sequence; each sequence has its own seeded generator so that a
    prompt's sample does not depend on the other prompts of the batch."""

    def __init__(self, params: SamplingParams, batch: int, device: torch.device) -> None:
        self.params = params
        self.generators = []
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.seed() % 2**63)
            for _ in range(batch):
                generator = torch.Generator(device=device)
                generator.manual_seed(seed)
                self.generators.append(generator)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (B, vocab) float32 -> (B,) token ids."""
        if self.params.greedy:
            return logits.argmax(dim=-1)
        probs = filtered_probabilities(logits, self.params)
        picks = [
            torch.multinomial(row, 1, generator=generator)
            for row, generator in zip(probs, self.generators, strict=True)
        ]
        return torch.cat(picks)


def filtered_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Softmax of logits / temperature after the top-k and top-p filters. (B, vocab)."""
    scaled = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scaled, min(params.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p  # the top token is never dropped
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.softmax(scaled, dim=-1)
