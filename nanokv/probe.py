"""KVzip's query-agnostic probe (Kim et al. 2025, arXiv 2505.23416; kvpress `KVzipPress`).

The document is fed again after an instruction to repeat it; the keys that this copy attends to
are the ones the model needs to reproduce the document, whatever question comes later. The rule
follows kvpress's `KVzipPress.prepare` and `score_kvzip`:

- the document's own tokens (after the chat template's prefix) are cut in spans of 2048, or
  fewer where a segment would otherwise run past the model's context (kvpress runs past it);
- span i is repeated by one segment: "\\n\\nRepeat the previous context exactly." (span 0) or
  "\\n\\nRepeat the part of the previous context exactly, starting with" and the previous span's
  last 8 tokens (span i > 0), then the template's tail that closes the user turn and opens the
  assistant's (a newline without a template), then the span's tokens;
- a segment runs right after the document (positions n, n+1, ...), attending to the whole
  document and to itself; its K/V are dropped once it ran (no segment sees another);
- the score of a key j of span i is the max, over the segment's rows (instruction rows included)
  and over the query heads of j's GQA group, of the softmax probability of j, the softmax running
  over the document's first `sinks` keys, the span's keys and the segment's own keys up to the
  row (not over the rest of the document). Keys outside every span (the template's prefix, a
  BOS) score 0; the selection protects the sinks.

`repeat_probe` builds the segments (the LLM has the tokenizer) and cuts the document into
sentences for the shared sentences of the model-wide cut (nanokv/sentences.py); `ProbeScores` is
the running statistic the engine keeps per layer while it runs them, chunk by chunk (never an
n x n matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.kernels.prefill_scores import probe_attention
from nanokv.sentences import sentence_index
from nanokv.tokenizer import Tokenizer

REPEAT = "\n\nRepeat the previous context exactly."
REPEAT_PART = "\n\nRepeat the part of the previous context exactly, starting with"
SPAN_TOKENS = 2048  # kvpress `prepare(chunk_size=2048)`
OVERLAP_TOKENS = 8  # kvpress `prev_postfix_size`: the previous span's tail, quoted
SINKS = 4  # kvpress `n_sink`
RAW_TAIL = "\n"  # kvpress's suffix for a model without a chat template
_MARK = "\u2063nanokv-probe\u2063"


@dataclass(frozen=True)
class ProbeSegment:
    """One reconstruction: `ids` are fed after the document and score its span [start, end)."""

    ids: list[int]  # instruction + template tail + the span's tokens
    start: int
    end: int


@dataclass(frozen=True)
class Probe:
    """A document's reconstruction probe: its segments and the sinks in their softmax."""

    segments: tuple[ProbeSegment, ...]
    sinks: int = SINKS
    sentence_of: tuple[int, ...] = ()  # the sentence of each document token (nanokv/sentences.py)

    @property
    def longest(self) -> int:
        """Tokens of the longest segment: the positions the probe reaches past the document."""
        return max((len(segment.ids) for segment in self.segments), default=0)


def repeat_probe(
    tokenizer: Tokenizer,
    document_ids: list[int],
    *,
    span: int = SPAN_TOKENS,
    sinks: int = SINKS,
    context: int | None = None,
    held: list[int] | None = None,
) -> Probe:
    """KVzip's probe of `document_ids` (as prefilled: a chat-template prefix is recognised and
    not repeated). With a template whose prefix starts the document, the instruction continues
    the open user message and the template's tail opens the assistant's turn; otherwise (no
    template, or a raw document) the raw form is used and a leading BOS is not repeated. With
    the model's `context` (tokens), spans shrink so that no segment runs past it.

    `held` (ascending positions): repeat only the tokens at these positions, a document with
    gaps. A conversation repeats what its arena still holds: the evicted tokens have no keys
    left to score, and repeating every token seen would make each recompression a pass over
    the whole conversation (nanokv/conversation.py). A span then runs from its first held
    position to past its last."""
    if span < 1:
        raise ValueError(f"probe span must be >= 1 token, got {span}")
    prefix, tail = _template_parts(tokenizer)
    chat = prefix is not None and document_ids[: len(prefix)] == prefix
    first = len(prefix) if chat else _bos_length(tokenizer, document_ids)
    tail_ids = _encode(tokenizer, tail if chat else RAW_TAIL)
    if context is not None:
        span = min(span, _room(tokenizer, len(document_ids), len(tail_ids), context))
    n = len(document_ids)
    repeated = range(first, n) if held is None else [p for p in held if first <= p < n]
    segments = []
    for index in range(0, len(repeated), span):
        chunk = repeated[index : index + span]  # the positions this segment repeats
        if index == 0:
            instruction = _encode(tokenizer, REPEAT)
        else:
            quoted = repeated[max(0, index - OVERLAP_TOKENS) : index]
            instruction = _encode(tokenizer, REPEAT_PART) + [document_ids[p] for p in quoted]
        tokens = [document_ids[p] for p in chunk]
        segments.append(ProbeSegment(instruction + tail_ids + tokens, chunk[0], chunk[-1] + 1))
    return Probe(tuple(segments), sinks, sentence_index(tokenizer, document_ids))


def segment_overhead(tokenizer: Tokenizer, document_ids: list[int]) -> int:
    """Positions a segment of `document_ids`'s probe takes past the document besides its span:
    the longest instruction and the template's tail. A caller that keeps appending to the
    document (a conversation) keeps this many positions, plus some span, free in the context."""
    prefix, tail = _template_parts(tokenizer)
    chat = prefix is not None and document_ids[: len(prefix)] == prefix
    return _instruction_length(tokenizer) + len(_encode(tokenizer, tail if chat else RAW_TAIL))


def _instruction_length(tokenizer: Tokenizer) -> int:
    """Tokens of the longest instruction: the first segment's, or a later one's with its quote."""
    first = len(_encode(tokenizer, REPEAT))
    return max(first, len(_encode(tokenizer, REPEAT_PART)) + OVERLAP_TOKENS)


def _room(tokenizer: Tokenizer, n: int, tail: int, context: int) -> int:
    """The longest span whose segment, after n document tokens, stays inside `context`."""
    room = context - n - _instruction_length(tokenizer) - tail
    if room < 1:
        raise ValueError(
            f"the document has {n} tokens and leaves no room for KVzip's probe in the model's "
            f"{context}-token context: shorten it or use observe='last'"
        )
    return room


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _template_parts(tokenizer: Tokenizer) -> tuple[list[int] | None, str]:
    """(prefix ids, tail text) of one user message in the chat template (kvpress renders a dummy
    message the same way); (None, newline) without a usable template."""
    if tokenizer.chat_template is None:
        return None, RAW_TAIL
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}])
    if rendered.count(_MARK) != 1:
        return None, RAW_TAIL
    prefix, tail = rendered.split(_MARK)
    return _encode(tokenizer, prefix), tail


def _bos_length(tokenizer: Tokenizer, document_ids: list[int]) -> int:
    """1 when the document starts with the tokenizer's BOS (not repeated), else 0."""
    bos = tokenizer.token_id(tokenizer.config.get("bos_token"))
    return int(bos is not None and document_ids[:1] == [bos])


class ProbeScores:
    """One layer's running probe statistics for one sequence: per query head and document key
    the max attention over the probe rows seen so far, and (for output-aware policies) the sum
    of the squared norms of those rows' attention output. Nothing else of the probe is kept."""

    def __init__(
        self, q_heads: int, n: int, device: torch.device, *, sinks: int, output: bool
    ) -> None:
        self.n, self.sinks = n, sinks
        self.attention = torch.zeros(q_heads, n, dtype=torch.float32, device=device)  # (H_q, n)
        self.output_square = torch.zeros((), device=device) if output else None
        self.rows = 0

    def attend_rows(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        segment: ProbeSegment,
        *,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Folds in the rows q (c, H_q, D) at the end of the segment seen so far and returns
        their attention output (c, H_q * D), what ``prefill_attention`` gives: the probe's pass
        and its scoring share one set of logits (``probe_attention``). k, v: (n + r, H_kv, D) the
        document's keys and values, then the segment's first r (the rows' own last);
        positions: (n + r,). The score's softmax runs over the sinks, the span and the
        segment's keys (causal)."""
        attn, seen = probe_attention(
            q, k, v, scale=scale, positions=positions, document=self.n,
            span=(segment.start, segment.end), sinks=min(self.sinks, segment.start),
            sliding_window=sliding_window,
        )  # fmt: skip
        target = self.attention[:, segment.start : segment.end]
        torch.maximum(target, seen, out=target)
        return attn

    def add_output(self, attn: torch.Tensor, o_proj_weight: torch.Tensor) -> None:
        """Adds the rows' attention output (c, H_q * D) projected by W_O (no bias)."""
        if self.output_square is None:
            return
        out = attn.float() @ o_proj_weight.float().T  # (c, hidden)
        self.output_square += out.square().sum()
        self.rows += attn.shape[0]

    def output_norm(self) -> torch.Tensor | None:
        """RMS over the probe's rows of ``||o_i||``, () float32, or None when not collected."""
        if self.output_square is None:
            return None
        return (self.output_square / max(self.rows, 1)).sqrt()
