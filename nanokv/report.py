"""What a generate call kept: tokens per layer and head, arena bytes vs a full cache, timings."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheReport:
    """Filled by the engine after a generate call (`LLM.last_report`)."""

    policy: str
    budget: list[str]  # per sequence: the budget in tokens, the cache floor, which set the cache
    prompt_tokens: list[int]  # per sequence
    kept_after_prefill: torch.Tensor  # (L, B, H_kv) tokens each head held after prefill
    arena_bytes: int  # allocated by the arena (K, V and slot metadata)
    full_cache_bytes: int  # K and V of prompt + new tokens for every head, in the same dtype
    prefill_seconds: float
    eviction_seconds: float  # selection, compaction and decode-time evictions
    quest_read_fraction: float | None  # pages read / pages held, when Quest runs

    @classmethod
    def combine(cls, reports: list[CacheReport], eviction_seconds: float) -> CacheReport:
        """One report of requests that ran separately (one call's prompts through the
        scheduler), in order: sequences side by side, bytes and prefill time summed."""
        quest = [r.quest_read_fraction for r in reports if r.quest_read_fraction is not None]
        return cls(
            policy=reports[0].policy,
            budget=[line for r in reports for line in r.budget],
            prompt_tokens=[n for r in reports for n in r.prompt_tokens],
            kept_after_prefill=torch.cat([r.kept_after_prefill for r in reports], dim=1),
            arena_bytes=sum(r.arena_bytes for r in reports),
            full_cache_bytes=sum(r.full_cache_bytes for r in reports),
            prefill_seconds=sum(r.prefill_seconds for r in reports),
            eviction_seconds=eviction_seconds,
            quest_read_fraction=sum(quest) / len(quest) if quest else None,
        )

    def summary(self) -> str:
        """A few human lines for `nanokv generate --verbose`."""
        kept = self.kept_after_prefill.float()
        per_layer = kept.mean(dim=(1, 2)).round().int().tolist()
        lines = [
            f"policy {self.policy}: prompt {self.prompt_tokens} tokens; kept per head after "
            f"prefill: mean {kept.mean():.1f}, min {int(kept.min())}, max {int(kept.max())}",
            *dict.fromkeys(self.budget),  # one line per distinct prompt
            f"kept per layer (mean over heads): {per_layer}",
            f"arena {_size(self.arena_bytes, 'K, V and slot metadata')} vs full cache "
            f"{_size(self.full_cache_bytes, 'K and V')}: "
            f"{self.arena_bytes / max(self.full_cache_bytes, 1):.1%}",
            f"prefill {self.prefill_seconds * 1e3:.0f} ms, of which eviction "
            f"{self.eviction_seconds * 1e3:.0f} ms",
        ]
        if self.quest_read_fraction is not None:
            lines.append(f"quest read {self.quest_read_fraction:.1%} of the held pages per step")
        return "\n".join(lines)


def _size(count: int, what: str) -> str:
    """MiB for reading, exact bytes for checking: '0.02 MiB (19,456 bytes of K and V)'."""
    return f"{count / 2**20:.2f} MiB ({count:,} bytes of {what})"
