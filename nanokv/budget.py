"""The KV budget: a fraction of the prompt (0 < b <= 1) or a token count (b > 1), with a floor in
tokens under which no head is cut (a fraction of a short prompt is not a cache anyone wants)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """Tokens kept per (layer, kv head) on average; validated once, resolved per prompt.

    `floor`: no head keeps fewer tokens than this (nor than the prompt, if shorter); a sequence
    whose prompt and answer fit within it is never evicted. 0 keeps the budget exact."""

    value: float = 1.0
    floor: int = 0

    def __post_init__(self) -> None:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"budget must be a number, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"budget must be a fraction in (0, 1] or a token count > 1, got {value}"
            )
        if value > 1 and value != int(value):
            raise ValueError(f"a budget above 1 is a token count and must be whole, got {value}")
        floor = self.floor
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
            raise ValueError(f"the cache floor (min_cache) must be a whole count >= 0, got {floor}")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """From a command-line string such as '0.05' or '512'."""
        try:
            value = float(text)
        except ValueError:
            raise ValueError(
                f"budget {text!r} is not a number: use a fraction like 0.05 or a count like 512"
            ) from None
        return cls(value)

    @property
    def is_fraction(self) -> bool:
        return self.value <= 1

    def tokens(self, prompt_length: int) -> int:
        """Kept tokens for a prompt of `prompt_length` tokens (at least 1, at most the prompt)."""
        if self.is_fraction:
            return max(1, min(prompt_length, round(self.value * prompt_length)))
        return min(prompt_length, int(self.value))

    def cache_tokens(self, prompt_length: int, max_new_tokens: int) -> int:
        """Tokens a (layer, kv head) may hold after each eviction, never under the floor. A
        fraction of 1.0 means no compression at all: the prompt and every new token are kept."""
        if self.value == 1.0:
            return prompt_length + max_new_tokens
        kept = self.tokens(prompt_length) if self.is_fraction else int(self.value)
        return max(kept, self.floor)

    def is_floored(self, prompt_length: int) -> bool:
        """True when the floor, not the budget, sets the cache of a prompt this long."""
        return self.value != 1.0 and self.floor > 0 and self.tokens(prompt_length) < self.floor
