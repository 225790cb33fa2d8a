"""Token-level bookkeeping shared by the suites: counting, and where a text sits in the tokens."""

from __future__ import annotations

from collections.abc import Callable

from nanokv.tokenizer import Tokenizer


def counter(tokenizer: Tokenizer) -> Callable[[str], int]:
    """Tokens of a fragment, without special tokens (haystack pieces, needles)."""
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def token_span(tokenizer: Tokenizer, ids: list[int], text: str) -> tuple[int, int]:
    """[start, end) indices of the tokens of `ids` that cover the one occurrence of `text` in
    their decoded string. Prefix decodes are binary-searched, so no offsets are needed."""
    decoded = tokenizer.decode(ids)
    first = decoded.find(text)
    if first < 0 or decoded.find(text, first + 1) >= 0:
        raise ValueError(f"{text!r} must occur exactly once in the prompt")
    start = _first_prefix_longer_than(tokenizer, ids, first) - 1
    end = _first_prefix_longer_than(tokenizer, ids, first + len(text) - 1)
    return start, end


def _first_prefix_longer_than(tokenizer: Tokenizer, ids: list[int], chars: int) -> int:
    """Smallest k with len(decode(ids[:k])) > chars."""
    low, high = 0, len(ids)
    while low < high:
        mid = (low + high) // 2
        if len(tokenizer.decode(ids[:mid])) > chars:
            high = mid
        else:
            low = mid + 1
    return low


def token_positions(tokenizer: Tokenizer, ids: list[int], texts: tuple[str, ...]) -> list[int]:
    """Indices of the tokens of `ids` that cover each of `texts` (e.g. a needle's value), each
    of which occurs exactly once in their decoded string."""
    positions: list[int] = []
    for text in texts:
        start, end = token_span(tokenizer, ids, text)
        positions += range(start, end)
    return positions
