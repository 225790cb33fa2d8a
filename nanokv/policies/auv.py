"""AUV (Li, Wang et al.: attention score aggregation + usage count; papers/AUV.txt).

(a) Prefill aggregation: each attention row i is scaled by N_i / N_max (valid entries over the
most in any row) and each column is averaged over the rows that see it (its Sec. 3.2), so early
tokens are not favoured the way H2O's column sums favour them. Summed over a GQA group as a mean.
(b) Decode: the aggregated score (AAS) is a running mean (eq. 3-4) of the scaled attention rows,
and the `usage_top_k` most attended slots of each step get usage += 1.
(c) Multi-step eviction: victims are the lowest of ``usage * max(AAS) + AAS`` (eq. 5); after each
eviction ``usage = (usage - min(usage)) * alpha`` (eq. 6).
(d) Reconstructed K/V: the AAS-weighted mean of everything evicted sits in one extra slot per kv
head (eqs. 7-8, see reconstruct.py).
(e) Memory: the decode window and scatter of eviction.py (its Fig. 4).

The paper gives neither k of the usage top-k nor alpha, and has no public code: `usage_top_k = 8`
and `usage_decay = 0.5` are our defaults. At decode N_max is the longest row seen (the prompt
length), so a decode row over a compressed cache weighs N_i / N_max of a full prompt row.
"""

from __future__ import annotations

import torch

from nanokv.arena import ArenaLayer
from nanokv.kernels.decode_attention import Emitted
from nanokv.kernels.prefill_scores import visible_counts
from nanokv.policies.base import Policy, PromptLayer, prompt_column_statistics
from nanokv.reconstruct import RECONSTRUCTED_POS


class AUV(Policy):
    name = "auv"
    needs_all_queries = True
    needs_decode_mass = True
    decode_statistics = "stepwise"
    reconstructs = True
    slot_state = ("usage", "score_count")
    defaults = {"pool": 1}

    def initial_memory(self, batch: int) -> dict[str, torch.Tensor]:
        return {"longest_row": torch.ones(batch)}  # N_max of each sequence

    def prefill_scores(self, prompt: PromptLayer) -> torch.Tensor:
        stats = prompt_column_statistics(prompt)
        kv_heads, n = prompt.k.shape[0], prompt.k.shape[1]
        self.memory["longest_row"][prompt.seq] = n
        scores = stats.auv_means.view(kv_heads, -1, n).mean(dim=1)  # (H_kv, n)
        return self.smooth(scores)

    def prefill_state(self, prompt: PromptLayer) -> dict[str, torch.Tensor]:
        """Initial per-slot state: each prompt token's AAS averages over the rows that see it."""
        _, seen_by = visible_counts(prompt.positions, prompt.sliding_window)
        count = seen_by.float().expand(prompt.k.shape[0], -1)
        return {"score_count": count, "usage": torch.zeros_like(count)}

    def observe_decode(
        self, layer: int, view: ArenaLayer, emitted: Emitted | None
    ) -> dict[str, torch.Tensor]:
        valid = (view.pos >= 0) & (emitted.mass > 0)  # attended, not the reconstructed slot
        group_mass = emitted.mass.sum(dim=-1, keepdim=True)  # = group size: rows sum to 1
        attended = view.lengths.float().unsqueeze(-1)  # N_i
        longest = self.memory["longest_row"].to(attended.device).view(-1, 1, 1)
        longest = torch.maximum(longest, attended)
        row = emitted.mass / group_mass * attended / longest  # eq. 3's scaled row, group mean
        count = view.state["score_count"]
        updated = (row + view.score * count) / (count + 1)
        return {
            "score": torch.where(valid, updated, view.score),
            "score_count": count + valid.float(),
            "usage": self._counted_usage(view, emitted.mass.masked_fill(~valid, -1.0)),
        }

    def observe_steps(
        self, layer: int, view: ArenaLayer, emitted: Emitted, lengths: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """`observe_decode` over n steps at once (mass (B, H_kv, n, C)): eq. 3's running mean
        after n more rows is the mean of the old count of rows and the new valid ones, so the
        rows are summed rather than folded in one by one; usage counts each step's top-k."""
        mass = emitted.mass
        valid = (view.pos >= 0).unsqueeze(2) & (mass > 0)  # (B, H_kv, n, C)
        group_mass = mass.sum(dim=-1, keepdim=True)
        attended = lengths.transpose(1, 2).float().unsqueeze(-1)  # (B, H_kv, n, 1): N_i
        longest = self.memory["longest_row"].to(attended.device).view(-1, 1, 1, 1)
        rows = mass / group_mass * attended / torch.maximum(longest, attended)
        count, new_rows = view.state["score_count"], valid.float().sum(dim=2)
        total = (view.score * count + (rows * valid).sum(dim=2)) / (count + new_rows)
        return {
            "score": torch.where(new_rows > 0, total, view.score),
            "score_count": count + new_rows,
            "usage": self._counted_usage(view, mass.masked_fill(~valid, -1.0)),
        }

    def _counted_usage(self, view: ArenaLayer, mass: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, C) usage after the steps of `mass` ((B, H_kv, C) one step, or
        (B, H_kv, n, C)): +1 for the `usage_top_k` most attended slots of each."""
        k = min(self.options.usage_top_k, mass.shape[-1])
        top = torch.topk(mass, k, dim=-1).indices  # (B, H_kv, [n,] k)
        hit = (mass.gather(-1, top) > 0).float()
        usage = view.state["usage"]
        return usage.scatter_add(-1, top.flatten(2), hit.flatten(2))

    def eviction_scores(self, layer: int, view: ArenaLayer) -> torch.Tensor:
        usage, aas = view.state["usage"], view.score
        real = view.pos >= 0
        max_aas = aas.masked_fill(~real, float("-inf")).amax(dim=-1, keepdim=True).clamp_min(0)
        return usage * max_aas + aas  # eq. 5

    def before_eviction(
        self, layer: int, view: ArenaLayer, victims: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        usage = view.state["usage"]
        evicting = (victims >= 0).any(dim=-1, keepdim=True)  # (B, H_kv, 1)
        real = view.pos >= 0
        staying = real.scatter(-1, victims.clamp_min(0), False) | ~evicting
        low = usage.masked_fill(~staying, float("inf")).amin(dim=-1, keepdim=True)
        decayed = (usage - low).clamp_min(0) * self.options.usage_decay  # eq. 6
        return {"usage": torch.where(evicting & real, decayed, usage)}


__all__ = ["AUV", "RECONSTRUCTED_POS"]
