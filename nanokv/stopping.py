"""When a sequence stops (EOS, stop string, length) and which text it has produced so far."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanokv.engine import Sequence


class StopChecker:
    """Appends tokens to sequences, detokenizes them and decides when each one is finished.

    Streamed text holds back an incomplete UTF-8 character and any tail that could still become a
    stop string, so that what was streamed is always a prefix of the final text.
    """

    def __init__(
        self,
        detokenize: Callable[[list[int]], str] | None,
        eos_token_ids: Iterable[int],
        stop: Iterable[str] = (),
        ignore_eos: bool = False,
    ) -> None:
        self.detokenize = detokenize
        self.eos_token_ids = set() if ignore_eos else set(eos_token_ids)
        self.stop = list(stop)

    def advance(self, seq: Sequence, token: int, is_last: bool) -> str:
        """Records `token` for `seq`; returns the newly visible text."""
        seq.token_ids.append(token)
        if token in self.eos_token_ids:
            seq.finish_reason = "stop"
        text = self.detokenize(self._text_tokens(seq)) if self.detokenize else ""
        cut = self._first_stop(text)
        if cut is not None:
            text, seq.finish_reason = text[:cut], "stop"
        if seq.finish_reason is None and is_last:
            seq.finish_reason = "length"
        if seq.finish_reason is None:
            text = text[: len(text) - self._held_back(text)]
        delta = text[len(seq.text) :] if text.startswith(seq.text) else ""
        seq.text = text if seq.finish_reason or delta else seq.text
        return delta

    def _text_tokens(self, seq: Sequence) -> list[int]:
        ids = seq.token_ids
        return ids[:-1] if ids and ids[-1] in self.eos_token_ids else ids

    def _first_stop(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stop if s in text]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` not yet safe to show."""
        held = len(text) - len(text.rstrip("\ufffd"))
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    held = max(held, size)
                    break
        return held
