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

from collections.abc import Callable

import torch

from nanokv.arena import ArenaLayer
from nanokv.kernels.decode_attention import Emitted
from nanokv.policies.base import (
    Policy,
    ProbedKeys,
    PromptLayer,
    group_max,
    observation_attention,
    probed_keys,
)


class LaProx(Policy):
    name = "laprox"
    needs_value_norms = True
    decode_statistics = "summed"
    observes_window = True
    defaults = {"allocation": "global", "pool": 31}

    def initial_memory(self, batch: int) -> dict[str, torch.Tensor]:
        return {"normaliser": torch.ones(0, batch)}  # (L, B), grown as layers are prefilled

    def prefill_scores(self, prompt: PromptLayer) -> torch.Tensor:
        if self.options.observe == "repeat":
            return self.score_probe(probed_keys(prompt))
        attn = observation_attention(prompt)  # (H_q, w, n)
        kv_heads, n = prompt.k.shape[0], prompt.k.shape[1]
        per_query_head = attn.norm(dim=1) * prompt.value_norms  # (H_q, n)
        scores = per_query_head.view(kv_heads, -1, n).sum(dim=1)  # (H_kv, n)

        def window_norm() -> torch.Tensor:  # ||O||_F, computed only when the normaliser is fro
            return window_output(attn, prompt).norm()

        return self._normalised(prompt.layer, prompt.seq, scores, window_norm)

    def score_probe(self, keys: ProbedKeys) -> torch.Tensor:
        """KVzip+'s output-aware form: ``max_h max_i a[h, i, j] ||v_j W_O^h||``, normalised by
        the probe's RMS row output norm (``fro``)."""
        scores = group_max(keys.attention * keys.value_norms.float(), keys.kv_heads)
        return self._normalised(keys.layer, keys.seq, scores, lambda: keys.output_norm)

    def _normalised(
        self, layer: int, seq: int, scores: torch.Tensor, output: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """scores (H_kv, n) divided by the layer's scale -- 1, their sum, or the attention
        output's norm `output()` -- which decode-time contributions are divided by too."""
        if self.options.normalise == "none":
            normaliser = 1.0
        elif self.options.normalise == "sum":
            normaliser = max(float(scores.sum()), 1e-30)
        else:
            normaliser = max(float(output()), 1e-30)
        self._remember(layer, seq, normaliser)
        return self.smooth(scores / normaliser)

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
