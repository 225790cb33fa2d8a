"""Each prompt token's self-information, -log p(x_j | x_<j), from the prompt's own forward pass.

A token the model predicts from what came before can be regenerated; one it cannot -- a name, a
number, a code -- exists only in its K/V. Selective Context (Li et al. 2023) and LLMLingua (Jiang
et al. 2023) prune a prompt's low-information tokens for this reason. Here it weighs KVzip's
query-agnostic probe scores at the model-wide cut (``PolicyOptions.information``): the probe says
which keys reconstructing the document reads, the self-information how much of the document only
that key holds. It needs the final hidden state of every prompt position, which the layer-major
prefill has once its last layer ran, so it applies where the selection is made then (the
`global` and `layerwise` allocations), among each head's provisional best `head_cap` tokens
(every token under the probe's uncapped default at 5% and 10%). A conversation records each
token's information when it is written (`InformationTrail`) and weighs its recompression too.
Off by default: on context-only NIAH and the chat suite it did not help (docs/eval.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK = 256  # rows of (rows, vocab) logits at a time


def token_information(
    logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    ids: torch.Tensor,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """(n,) float32 self-information in nats of tokens `ids` (n,) whose final hidden states
    (before the model's final norm) are `hidden` (n, hidden); `logits` is the model's head
    ((T, hidden) -> (T, vocab) float32). Token j's comes from position j - 1's prediction; the
    first token, which nothing predicts, gets the largest of the others (it is a sink anyway)."""
    n = ids.shape[0]
    information = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    for start in range(0, n - 1, chunk):
        end = min(start + chunk, n - 1)
        log_p = torch.log_softmax(logits(hidden[start:end]), dim=-1)  # (rows, vocab)
        following = ids[start + 1 : end + 1].long().unsqueeze(-1)
        information[start + 1 : end + 1] = -log_p.gather(-1, following).squeeze(-1)
    if n > 1:
        information[0] = information[1:].max()
    return information


def weigh(scores: torch.Tensor, positions: torch.Tensor, information: torch.Tensor) -> torch.Tensor:
    """Scores (..., C) of slots holding prompt `positions` (..., C) times those tokens'
    `information` (n,); slots holding no prompt token (empty, reconstructed, or written after
    the prompt) keep their score."""
    n = information.shape[0]
    prompt_token = (positions >= 0) & (positions < n)
    weights = information[positions.long().clamp(0, n - 1)]
    return torch.where(prompt_token, scores * weights, scores)


class InformationTrail:
    """The self-information of every token written to a live arena, by position: what a
    conversation's recompression weighs (its tokens arrive in turns and decode steps, each
    predicted by what the arena held then)."""

    def __init__(self) -> None:
        self._values: list[torch.Tensor] = []  # per write, (m,) float32
        self._prediction: torch.Tensor | None = None  # (vocab,) logits for the next position

    def chunk_written(
        self,
        ids: torch.Tensor,
        hidden: torch.Tensor,
        logits: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Tokens `ids` (m,) were written at the next positions with final hidden states
        `hidden` (m, hidden). Returns the (1, vocab) logits that follow them."""
        information = token_information(logits, hidden, ids)
        information[0] = self._first(int(ids[0]))
        last = logits(hidden[-1:])  # (1, vocab)
        self._values.append(information)
        self._prediction = last[0]
        return last

    def step_written(self, token: int, logits: torch.Tensor) -> None:
        """`token` was written at the next position and predicts `logits` (1, vocab)."""
        self._values.append(self._first(token).view(1))
        self._prediction = logits[0]

    def _first(self, token: int) -> torch.Tensor:
        """-log p(token) under the last prediction; NaN (filled later) when there is none."""
        if self._prediction is None:
            return torch.tensor(float("nan"))
        return -torch.log_softmax(self._prediction.float(), dim=-1)[token]

    def values(self) -> torch.Tensor:
        """(positions written,) float32; the first token, which nothing predicted, gets the
        largest of the others (it is a sink anyway)."""
        values = torch.cat([value.to(self._values[0].device) for value in self._values])
        known = values[~values.isnan()]
        return values.nan_to_num(float(known.max()) if known.numel() else 1.0)
