"""TOVA (Oren et al. 2024, schwartz-lab-NLP/TOVA `tova_cache.py`): the current query's attention
decides; each eviction drops the lowest. Prompt score = attention of the last prompt query,
averaged over each GQA group; at decode the score of every slot is replaced by the new query's
attention (not accumulated). With observe="repeat" the prompt score is KVzip's probe score
(max over the probe's rows and the GQA group, see nanokv/probe.py) instead of the last query's."""

from __future__ import annotations

import torch

from nanokv.arena import ArenaLayer
from nanokv.kernels.decode_attention import Emitted
from nanokv.policies.base import Policy, PromptLayer, observation_attention, probed_keys


class TOVA(Policy):
    name = "tova"
    needs_decode_mass = True
    decode_statistics = "last"
    observes_window = True

    def prefill_scores(self, prompt: PromptLayer) -> torch.Tensor:
        if self.options.observe == "repeat":
            return self.score_probe(probed_keys(prompt))  # (H_kv, n)
        attn = observation_attention(prompt, last=1)[:, 0]  # (H_q, n)
        scores = attn.view(prompt.k.shape[0], -1, attn.shape[-1]).mean(dim=1)
        return self.smooth(scores)

    def observe_decode(
        self, layer: int, view: ArenaLayer, emitted: Emitted | None
    ) -> dict[str, torch.Tensor]:
        return {"score": emitted.mass}  # replaced, not accumulated
