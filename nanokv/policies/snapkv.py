"""SnapKV (Li et al. 2024): attention of the last `w` prompt queries (the observation window) to
every prompt key, averaged over the window and over each GQA group (kvpress `SnapKVPress`),
max-pooled along tokens (kernel 7: SnapKV's LongBench configs `..._w32_k7_maxpool.json`), top-k
per kv head; the window itself is kept. Decode-time evictions rank slots by the attention mass
the kernel emits, accumulated since the slot was written, added to the prompt score.

With observe="repeat" the prompt score is KVzip's (nanokv/probe.py): the probe's attention to each
key, max over the probe's rows and over the GQA group, then the same smoothing and selection."""

from __future__ import annotations

import torch

from nanokv.arena import ArenaLayer
from nanokv.kernels.decode_attention import Emitted
from nanokv.policies.base import Policy, PromptLayer, observation_attention, probed_keys


class SnapKV(Policy):
    name = "snapkv"
    needs_decode_mass = True
    decode_statistics = "summed"
    observes_window = True

    def prefill_scores(self, prompt: PromptLayer) -> torch.Tensor:
        if self.options.observe == "repeat":
            return self.score_probe(probed_keys(prompt))  # (H_kv, n)
        attn = observation_attention(prompt)  # (H_q, w, n)
        kv_heads = prompt.k.shape[0]
        per_query_head = attn.mean(dim=1)  # (H_q, n)
        scores = per_query_head.view(kv_heads, -1, per_query_head.shape[-1]).mean(dim=1)
        return self.smooth(scores)

    def observe_decode(
        self, layer: int, view: ArenaLayer, emitted: Emitted | None
    ) -> dict[str, torch.Tensor]:
        return {"score": view.score + emitted.mass}
