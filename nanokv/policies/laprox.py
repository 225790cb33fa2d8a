"""LaProx (Kim & Mai 2026, arXiv 2605.07234): output-aware, layer-wise eviction.

The attention output on the observation window is a sum of column-row outer products,
``O = sum_{h, j} a[h, :, j] (v_j W_O^h)``; dropping term (h, j) costs at most
``||a[h, :, j]||_2 * ||v_j W_O^h||_2`` (the column-row sampling weights of Drineas, Kannan &
Mahoney). A kv head's score is the sum over its query heads; dividing a layer's scores by its
``||O||_F`` makes them comparable across layers, so one model-wide top-k can pick the tokens.

The paper's exact normalisation and window are not public: the normaliser (``fro``, ``sum``,
``none``), the allocation and the pooling are options, and the defaults (global top-k, ``||O||_F``,
a 31-wide max-pool) are the ones the reference study in DESIGN.md measured best on the default
model. Decode steps add the kernel's emitted output contribution ``sum_h a[h, j] c[h, j]``,
divided by the same layer normaliser.

With observe="repeat" the observation rows are KVzip's probe (nanokv/probe.py) and the score is
KVzip+'s output-aware form without its row normalisation: ``max_h max_i a[h, i, j] ||v_j W_O^h||``
over the probe's rows i and the query heads h of the group (the probe is a copy of the whole
document: a max, not LaProx's L2 norm over a few window rows, is what KVzip keeps). The ``fro``
normaliser is then the RMS over the probe's rows of the attention output's norm (a per-row scale,
like the max). The model-wide selection is unchanged.
"""

from __future__ import annotations

import torch

from nanokv.arena import ArenaLayer
from nanokv.kernels.decode_attention import Emitted
from nanokv.policies.base import Policy, PromptLayer, observation_attention, probe_scores


class LaProx(Policy):
    name = "laprox"
    needs_value_norms = True
    observes_window = True
    defaults = {"allocation": "global", "pool": 31}

    def initial_memory(self, batch: int) -> dict[str, torch.Tensor]:
        return {"normaliser": torch.ones(0, batch)}  # (L, B), grown as layers are prefilled

    def prefill_scores(self, prompt: PromptLayer) -> torch.Tensor:
        attn = None
        if self.options.observe == "repeat":
            scores = probe_scores(prompt, prompt.value_norms)  # (H_kv, n)
        else:
            attn = observation_attention(prompt)  # (H_q, w, n)
            kv_heads, n = prompt.k.shape[0], prompt.k.shape[1]
            per_query_head = attn.norm(dim=1) * prompt.value_norms  # (H_q, n)
            scores = per_query_head.view(kv_heads, -1, n).sum(dim=1)  # (H_kv, n)
        normaliser = self._normaliser(prompt, attn, scores)
        self._remember(prompt.layer, prompt.seq, normaliser)
        return self.smooth(scores / normaliser)

    def _normaliser(
        self, prompt: PromptLayer, attn: torch.Tensor | None, scores: torch.Tensor
    ) -> float:
        """The layer's scale: 1, the scores' sum, or the attention output's norm (``||O||_F`` of
        the window `attn`; without one, the probe's RMS row output norm)."""
        if self.options.normalise == "none":
            return 1.0
        if self.options.normalise == "sum":
            return max(float(scores.sum()), 1e-30)
        if attn is None:
            return max(float(prompt.probe_output_norm), 1e-30)
        return max(float(window_output(attn, prompt).norm()), 1e-30)

    def _remember(self, layer: int, seq: int, normaliser: float) -> None:
        table = self.memory["normaliser"]
        if table.shape[0] <= layer:
            grown = torch.ones(layer + 1, table.shape[1])
            grown[: table.shape[0]] = table
            self.memory["normaliser"] = table = grown
        table[layer, seq] = normaliser

    def observe_decode(
        self, layer: int, view: ArenaLayer, emitted: Emitted | None
    ) -> dict[str, torch.Tensor]:
        contribution = emitted.contribution
        table = self.memory["normaliser"]
        if table.shape[0] > layer:
            contribution = contribution / table[layer].to(contribution.device).view(-1, 1, 1)
        return {"score": view.score + contribution}


def window_output(attn: torch.Tensor, prompt: PromptLayer) -> torch.Tensor:
    """O = sum_{h, j} a[h, :, j] (v_j W_O^h): the attention layer's output on the window
    (w, hidden), without the o_proj bias (a constant the eviction cannot change)."""
    q_heads, w, n = attn.shape
    kv_heads, _, head_dim = prompt.v.shape
    values = prompt.v.float().repeat_interleave(q_heads // kv_heads, dim=0)  # (H_q, n, D)
    per_head = torch.bmm(attn, values)  # (H_q, w, D)
    concatenated = per_head.transpose(0, 1).reshape(w, q_heads * head_dim)
    return concatenated @ prompt.o_proj_weight.float().T
