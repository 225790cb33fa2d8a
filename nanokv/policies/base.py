"""What the engine asks of an eviction policy.

A policy produces scores, never mutations (kvpress's ScorerPress shape): per layer it scores the
prompt tokens of each kv head once (`prefill_scores`), keeps a running per-slot statistic in the
arena's `score` row from what the decode kernel emits (`observe_decode`), and when the decode
window is full it ranks the candidate slots (`eviction_scores`). Shared code in `selection.py`
turns scores into kept slots; only the engine and the arena move data. Policies know nothing of
the model's architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.arena import ArenaLayer
from nanokv.kernels.decode_attention import Emitted


@dataclass(frozen=True)
class PolicyOptions:
    """Knobs shared by the score-based policies (defaults: DESIGN.md, "Policies")."""

    sinks: int = 4  # first tokens always kept (StreamingLLM's attention sinks)
    observation_window: int = 32  # last prompt queries used for scoring; these tokens are kept
    pool: int = 7  # max-pool kernel along tokens (SnapKV); 1 disables pooling
    chunk: int = 1  # rank chunks of this many consecutive tokens and keep whole chunks
    decode_window: int = 16  # W: new tokens written before a multi-step eviction frees W slots

    def __post_init__(self) -> None:
        for name in ("sinks", "observation_window", "decode_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd kernel size >= 1, got {self.pool}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")


@dataclass(frozen=True)
class PromptLayer:
    """One layer's prompt of one sequence, as the policy sees it after that layer ran."""

    layer: int
    k: torch.Tensor  # (H_kv, n, D), after RoPE
    v: torch.Tensor  # (H_kv, n, D)
    positions: torch.Tensor  # (n,)
    window_queries: torch.Tensor  # (H_q, w, D), the last w prompt queries, after RoPE
    scale: float
    sliding_window: int | None = None
    queries: torch.Tensor | None = None  # (H_q, n, D), only for policies that need every query


class Policy:
    """Base class: the full cache (no scores needed, nothing evicted)."""

    name = "base"
    evicts = True
    needs_all_queries = False  # prompt column statistics (H2O, AUV)
    needs_decode_mass = False  # the decode kernel's emitted attention mass

    def __init__(self, options: PolicyOptions | None = None) -> None:
        self.options = options or PolicyOptions()

    def prefill_scores(self, prompt: PromptLayer) -> torch.Tensor:
        """(H_kv, n) float32: higher keeps. Sinks and the observation window are protected by
        the selection code, not here."""
        raise NotImplementedError

    def observe_decode(self, layer: int, view: ArenaLayer, emitted: Emitted | None) -> None:
        """Updates the running statistic in `view.score` after a decode step (default: none)."""

    def eviction_scores(self, layer: int, view: ArenaLayer) -> torch.Tensor:
        """(B, H_kv, C) float32 ranking of the arena's slots when W must be freed."""
        return view.score
