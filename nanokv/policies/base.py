"""What the engine asks of an eviction policy.

A policy computes, it never writes the arena (kvpress's ScorerPress shape: scores in, shared code
decides). Per layer it scores the prompt tokens of each kv head once (`prefill_scores`, plus the
initial values of any extra per-slot statistic, `prefill_state`); after each decode step it
returns the new values of its per-slot statistics from what the decode kernel emitted
(`observe_decode`: a dict such as ``{"score": (B, H_kv, C)}``, or None); just before a
multi-step eviction it may return more such rows (`before_eviction`, AUV's usage decay); and when
the decode window is full it ranks the candidate slots (`eviction_scores`). The eviction stage
(`eviction.py`) writes the returned rows into the arena, turns scores into kept slots with the
shared code of `selection.py`, and has the arena move the data. The one state a policy updates
itself is its per-call memory (`bind`: per-sequence values such as AUV's longest row or LaProx's
layer normalisers), which belongs to the call, not to the arena. Policies know nothing of the
model's architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.arena import ArenaLayer
from nanokv.kernels.decode_attention import Emitted
from nanokv.kernels.prefill_scores import ColumnStats, column_statistics, window_attention
from nanokv.policies.allocation import ALLOCATIONS, MODEL_WIDE
from nanokv.policies.selection import chunk_scores, pool_scores

OBSERVATIONS = ("last", "repeat")  # where an observation-window policy takes its queries from
# PolicyOptions overrides that hold with observe="repeat" unless given explicitly: the one place
# to change them. KVzip keeps only sinks (no recent window) and does not pool (DESIGN.md,
# "Context-only": a max-pool hurt KVzip's scores on the default model), and caps no head: a head
# may keep up to 20x the mean (all of a 5% budget's prompt), which held the needle in more
# context-only cases than the cap of 4 in every cell measured (docs/eval.md), and costs no more
# memory once decoding since each head holds only its own slots (`KVArena.pack_heads`).
REPEAT_DEFAULTS: dict[str, object] = {"pool": 1, "observation_window": 0, "max_head_share": 20.0}
# ... and where the allocation is model-wide (global, layerwise): the share of the mean head
# budget kept as whole sentences in every head (nanokv/sentences.py); of 0.4, 0.6 and 0.8 tried
# on the context-only NIAH grid, 0.4 lost cases and 0.8 kept no more; 0.4 lost ten cells again
# under the cubed ranking (docs/eval.md, "Shared sentences" and "Ranking the sentences ...").
# A conversation gives the same share of its room to whole turns (nanokv/turn_memory.py).
REPEAT_SENTENCES = 0.6


@dataclass(frozen=True)
class PolicyOptions:
    """Knobs shared by the score-based policies (defaults: DESIGN.md, "Policies")."""

    sinks: int = 4  # first tokens always kept (StreamingLLM's attention sinks)
    observation_window: int = 32  # last prompt tokens kept; with observe="last" also the queries
    pool: int = 7  # max-pool kernel along tokens (SnapKV); 1 disables pooling
    chunk: int = 1  # rank chunks of this many consecutive tokens and keep whole chunks
    decode_window: int = 16  # W: new tokens written before a multi-step eviction frees W slots
    allocation: str = "uniform"  # uniform | pyramid | layer | global | layerwise (allocation.py)
    min_head_share: float = 0.0  # layer/global: every head keeps >= this share of the budget
    max_head_share: float = 4.0  # layer/global/layerwise: no head (layer) keeps more than this
    normalise: str = "fro"  # LaProx: per-layer score normaliser, fro (||O||_F) | sum | none
    usage_top_k: int = 8  # AUV: most attended slots of a step whose usage count grows
    usage_decay: float = 0.5  # AUV: alpha of eq. 6
    reconstruct: bool = True  # AUV: keep evicted tokens' weighted mean in one extra slot
    observe: str = "last"  # snapkv/laprox/tova: "last" w prompt queries or KVzip's "repeat" probe
    information: bool = False  # global/layerwise: scores times -log p(x_j | x_<j) at the cut
    sentences: float = 0.0  # global/layerwise, where KVzip's probe runs: share of shared sentences

    def __post_init__(self) -> None:
        for name in ("sinks", "observation_window", "decode_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd kernel size >= 1, got {self.pool}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(
                f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}"
            )
        if not 0.0 <= self.min_head_share <= 1.0:
            raise ValueError(f"min_head_share must be in [0, 1], got {self.min_head_share}")
        if self.normalise not in ("fro", "sum", "none"):
            raise ValueError(f"normalise must be fro, sum or none, got {self.normalise!r}")
        if self.usage_top_k < 1 or not 0.0 <= self.usage_decay <= 1.0:
            raise ValueError("usage_top_k must be >= 1 and usage_decay in [0, 1]")
        if self.max_head_share < 1.0:
            raise ValueError(f"max_head_share must be >= 1, got {self.max_head_share}")
        if self.information and self.allocation not in MODEL_WIDE:
            raise ValueError(
                "information weighs the scores at the model-wide cut, after the last layer: "
                f"use allocation global or layerwise (got {self.allocation!r})"
            )
        self._check_sentences()
        if self.observe not in OBSERVATIONS:
            raise ValueError(
                f"observe must be 'last' (the last prompt queries) or 'repeat' (KVzip's probe), "
                f"got {self.observe!r}"
            )

    def _check_sentences(self) -> None:
        """ValueError for a share outside [0, 1) or one that no model-wide cut would use."""
        if not 0.0 <= self.sentences < 1.0:
            raise ValueError(f"sentences must be in [0, 1), got {self.sentences}")
        if self.sentences and self.allocation not in MODEL_WIDE:
            raise ValueError(
                "sentences are shared by every head at the model-wide cut: use allocation "
                f"global or layerwise (got {self.allocation!r})"
            )


@dataclass(frozen=True)
class PromptLayer:
    """One layer's prompt of one sequence, as the policy sees it after that layer ran."""

    layer: int
    seq: int  # row of the batch
    k: torch.Tensor  # (H_kv, n, D), after RoPE
    v: torch.Tensor  # (H_kv, n, D)
    positions: torch.Tensor  # (n,)
    window_queries: torch.Tensor  # (H_q, w, D), the last w prompt queries, after RoPE
    scale: float
    sliding_window: int | None = None
    queries: torch.Tensor | None = None  # (H_q, n, D), only for policies that need every query
    value_norms: torch.Tensor | None = None  # (H_q, n) ||v_j W_O^h||, for output-aware policies
    o_proj_weight: torch.Tensor | None = None  # (hidden, H_q * D), for output-aware policies
    # observe="repeat" (nanokv/probe.py): per query head, the max over the probe's rows of each
    # key's attention (0 outside the repeated spans), and the RMS over those rows of the
    # attention output's norm (for output-aware policies)
    probe_attention: torch.Tensor | None = None  # (H_q, n) float32
    probe_output_norm: torch.Tensor | None = None  # () float32


def observation_attention(prompt: PromptLayer, last: int | None = None) -> torch.Tensor:
    """(H_q, w, n) float32 causal attention of the last `last` (default: all w) observation-window
    queries to every prompt key, for the policies that score from it."""
    queries = prompt.window_queries if last is None else prompt.window_queries[:, -last:]
    window = queries.shape[1]
    return window_attention(
        queries, prompt.k, scale=prompt.scale, query_positions=prompt.positions[-window:],
        key_positions=prompt.positions, sliding_window=prompt.sliding_window,
    )  # fmt: skip


@dataclass(frozen=True)
class ProbedKeys:
    """What KVzip's probe saw of one layer's keys of one sequence: a prompt's tokens at prefill
    (`probed_keys`), or a live arena's held slots when a conversation is recompressed."""

    layer: int
    seq: int
    kv_heads: int
    attention: torch.Tensor  # (H_q, n) float32, per query head the max over the probe's rows
    value_norms: torch.Tensor | None = None  # (H_q, n) ||v_j W_O^h||, output-aware policies
    output_norm: torch.Tensor | None = None  # () RMS over the probe's rows of ||o_i||


def probed_keys(prompt: PromptLayer) -> ProbedKeys:
    """The probe's view of a prompt layer (observe="repeat")."""
    if prompt.probe_attention is None:
        raise ValueError(
            "observe='repeat' needs the probe's attention: pass probes= to Engine.start "
            "(nanokv.probe.repeat_probe) or run through nanokv.LLM"
        )
    return ProbedKeys(
        prompt.layer, prompt.seq, prompt.k.shape[0], prompt.probe_attention,
        prompt.value_norms, prompt.probe_output_norm,
    )  # fmt: skip


def group_max(per_query_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(H_kv, n) float32: the max of (H_q, n) scores over each kv head's GQA group (KVzip)."""
    n = per_query_head.shape[-1]
    return per_query_head.float().view(kv_heads, -1, n).amax(dim=1)


def prompt_column_statistics(prompt: PromptLayer) -> ColumnStats:
    """Column statistics of the causal attention of every prompt query (H2O, AUV), computed in
    query chunks (never an n x n matrix)."""
    return column_statistics(
        prompt.queries, prompt.k, scale=prompt.scale, positions=prompt.positions,
        sliding_window=prompt.sliding_window,
    )  # fmt: skip


class Policy:
    """Base class: the full cache (no scores needed, nothing evicted)."""

    name = "base"
    evicts = True
    needs_all_queries = False  # prompt column statistics (H2O, AUV)
    needs_decode_mass = False  # the decode kernel's emitted attention mass
    needs_value_norms = False  # ||v_j W_O^h|| per slot, and emitted output contributions
    # what observe_decode needs of the emitted statistics: "every step" (one call a step), or
    # "summed" (it adds a linear function of them to the scores), "last" (it keeps only the
    # latest step's) or "stepwise" (`observe_steps` takes several steps' at once), which let
    # the engine defer them to the next eviction and emit the steps since in one batched pass
    # (`Engine.settle`)
    decode_statistics = "every step"
    reconstructs = False  # keeps a reconstructed K/V slot per head (AUV)
    observes_window = False  # scores from observation queries, so observe="repeat" applies
    slot_state: tuple[str, ...] = ()  # extra per-slot statistics the arena keeps for it
    defaults: dict[str, object] = {}  # PolicyOptions overrides that suit this policy

    def __init__(self, **options: object) -> None:
        """`options` are PolicyOptions fields; unset ones take this policy's defaults (and, with
        observe="repeat", REPEAT_DEFAULTS, and REPEAT_SENTENCES under a model-wide allocation).
        A policy without an observation window rejects observe="repeat": there are no
        observation queries for the probe to replace."""
        observe = options.get("observe", self.defaults.get("observe", "last"))
        repeat = REPEAT_DEFAULTS if observe == "repeat" else {}
        merged = {**self.defaults, **repeat, **options}
        if observe == "repeat" and merged.get("allocation") in MODEL_WIDE:
            merged = {"sentences": REPEAT_SENTENCES, **merged}
        self.options = PolicyOptions(**merged)
        if self.options.observe == "repeat" and not self.observes_window:
            raise ValueError(
                f"policy {self.name!r} does not score from an observation window, so "
                "observe='repeat' has nothing to replace: use observe='last' or a policy with "
                "a window (snapkv, laprox, tova)"
            )
        self.bind({}, batch=1)

    def bind(self, memory: dict[str, torch.Tensor], batch: int | None = None) -> None:
        """Points the policy at one generate call's memory (per-sequence statistics that are
        not per slot). The engine binds a fresh dict before each prefill (`batch` given: fill it
        with `initial_memory`) and rebinds a call's dict before each of its decode steps, so a
        compressed context can be resumed after other calls."""
        self.memory = memory
        if batch is not None:
            memory.update(self.initial_memory(batch))

    def initial_memory(self, batch: int) -> dict[str, torch.Tensor]:
        """Per-call memory of a fresh call (default: none)."""
        return {}

    def prefill_scores(self, prompt: PromptLayer) -> torch.Tensor:
        """(H_kv, n) float32: higher keeps. Sinks and the observation window are protected by
        the selection code, not here."""
        raise NotImplementedError

    def score_probe(self, keys: ProbedKeys) -> torch.Tensor:
        """(H_kv, n) scores from KVzip's probe (observe="repeat"): the probe's attention to each
        key, max over its rows and over the GQA group, then the shared smoothing. Output-aware
        policies weight it first (LaProx)."""
        return self.smooth(group_max(keys.attention, keys.kv_heads))

    def smooth(self, scores: torch.Tensor) -> torch.Tensor:
        """The shared selection options applied to (H_kv, n) scores: max-pool, then chunks."""
        return chunk_scores(pool_scores(scores, self.options.pool), self.options.chunk)

    def prefill_state(self, prompt: PromptLayer) -> dict[str, torch.Tensor]:
        """Initial values (H_kv, n) of the extra per-slot statistics (default: zeros)."""
        return {}

    def observe_decode(
        self, layer: int, view: ArenaLayer, emitted: Emitted | None
    ) -> dict[str, torch.Tensor] | None:
        """The slot statistics after a decode step: name ("score" or one of `slot_state`) ->
        new (B, H_kv, C) values, which the eviction stage writes. `view` is read, never
        written. Default: nothing changes (None)."""
        return None

    def observe_steps(
        self, layer: int, view: ArenaLayer, emitted: Emitted, lengths: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """`observe_decode` for n deferred steps at once, for a "stepwise" policy: emitted
        statistics (B, H_kv, n, C) of step t, which saw `lengths` (B, n, H_kv) valid slots."""
        raise NotImplementedError(f"{self.name} observes every step (decode_statistics)")

    def before_eviction(
        self, layer: int, view: ArenaLayer, victims: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """Sees the (B, H_kv, W) victim slots (-1 rows: that sequence is not evicting) before
        they are overwritten and returns statistics to write first, as `observe_decode` does
        (AUV decays its usage counts). Default: None."""
        return None

    def eviction_scores(self, layer: int, view: ArenaLayer) -> torch.Tensor:
        """(B, H_kv, C) float32 ranking of the arena's slots when W must be freed."""
        return view.score
