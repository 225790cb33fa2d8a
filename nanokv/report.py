"""What a generate call kept: tokens per layer and head, arena bytes vs a full cache, timings."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheReport:
    """Filled by the engine after a generate call (`LLM.last_report`)."""

    policy: str
    prompt_tokens: list[int]  # per sequence
    kept_after_prefill: torch.Tensor  # (L, B, H_kv) tokens each head held after prefill
    arena_bytes: int  # allocated by the arena (K, V and slot metadata)
    full_cache_bytes: int  # K and V of prompt + new tokens for every head, in the same dtype
    prefill_seconds: float
    eviction_seconds: float  # selection, compaction and decode-time evictions
    quest_read_fraction: float | None  # pages read / pages held, when Quest runs

    def summary(self) -> str:
        """A few human lines for `nanokv generate --verbose`."""
        kept = self.kept_after_prefill.float()
        per_layer = kept.mean(dim=(1, 2)).round().int().tolist()
        lines = [
            f"policy {self.policy}: prompt {self.prompt_tokens} tokens; kept per head after "
            f"prefill: mean {kept.mean():.1f}, min {int(kept.min())}, max {int(kept.max())}",
            f"kept per layer (mean over heads): {per_layer}",
            f"arena {self.arena_bytes / 2**20:.2f} MiB vs full cache "
            f"{self.full_cache_bytes / 2**20:.2f} MiB "
            f"({self.arena_bytes / max(self.full_cache_bytes, 1):.1%})",
            f"prefill {self.prefill_seconds * 1e3:.0f} ms, of which eviction "
            f"{self.eviction_seconds * 1e3:.0f} ms",
        ]
        if self.quest_read_fraction is not None:
            lines.append(f"quest read {self.quest_read_fraction:.1%} of the held pages per step")
        return "\n".join(lines)
