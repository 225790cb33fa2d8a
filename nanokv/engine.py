"""The engine: prefill -> evict -> decode for a batch of token sequences.

This is the only place where models and eviction policies meet. Prefill runs one sequence at a
time and one layer at a time over the whole prompt (in query chunks), so that at most one layer's
prompt K/V exists outside the arena: after each layer the policy chooses the kept tokens and only
those are copied into the arena. Decode runs the batch together, one token per sequence, against
the arena through the decode-attention kernel.

A policy that observes "repeat" scores from KVzip's probe (nanokv/probe.py): its segments run
through each layer right after the document, in the same layer pass; their queries score the
document's keys, their hidden states go on to the next layer, and their K/V are dropped before
the arena is filled.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from nanokv.arena import ArenaLayer, KVArena, PackedLayerView
from nanokv.attention import arena_chunk_attention, prefill_attention
from nanokv.budget import Budget
from nanokv.config import ModelConfig
from nanokv.eviction import EvictionStage, SequencePlan
from nanokv.information import InformationTrail, token_information, weigh
from nanokv.kernels.cpu_attention import cpu_emit_over_steps
from nanokv.kernels.decode_attention import Emitted, decode_attention, emitted_over_steps
from nanokv.kernels.packed_attention import packed_decode_attention
from nanokv.kernels.value_norms import output_gram, value_output_norms
from nanokv.models import kv_dtype
from nanokv.policies import Policy, PromptLayer
from nanokv.policies.base import ProbedKeys
from nanokv.probe import Probe, ProbeScores, ProbeSegment, repeat_probe
from nanokv.recompress import arena_probe_attention
from nanokv.report import CacheReport
from nanokv.sampling import Sampler, SamplingParams
from nanokv.sparsity import QuestOptions, QuestSparsity
from nanokv.step_clock import STOPPED, StepClock
from nanokv.stopping import StopChecker
from nanokv.tokenizer import Tokenizer
from nanokv.turn_memory import TurnMemory

TextCallback = Callable[[int, str], None]
DEFERRED_STEPS = 32  # most decode steps whose statistics wait for one batched emission


class InputError(ValueError):
    """A request the engine cannot serve (empty prompt, prompt longer than the context...)."""


@dataclass
class Sequence:
    """One prompt's generation: its tokens, text and why it stopped."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


@dataclass(frozen=True)
class PromptRecord:
    """One prompt's recorded forward pass (`Engine.record_prompt`): every layer as any policy
    could see it (all queries, value norms), and the last token's logits."""

    prompt: list[int]
    layers: list[PromptLayer]
    logits: torch.Tensor  # (1, vocab)
    probe: Probe | None = None  # recorded with the pass: its statistics are in `layers`
    hidden: torch.Tensor | None = None  # (n, hidden) every position's final hidden state
    _information: list[torch.Tensor] = field(default_factory=list, compare=False, repr=False)

    def information(self, logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(n,) the prompt tokens' self-information (nanokv/information.py), computed once
        with the model's head `logits`."""
        if not self._information:
            if self.hidden is None:
                raise ValueError("this record kept no hidden states: record it again")
            ids = torch.tensor(self.prompt, device=self.hidden.device)
            self._information.append(token_information(logits, self.hidden, ids))
        return self._information[0]


@dataclass
class _ProbeRun:
    """A probe on its way through the layer-major prefill of one sequence."""

    probe: Probe
    positions: torch.Tensor  # (n + longest,) the document's positions, then the probe's
    hidden: list[torch.Tensor]  # per segment (m, hidden), updated layer by layer


@dataclass
class DecodeState:
    """What the decode loop carries from step to step, in one object."""

    arena: KVArena
    positions: torch.Tensor  # (B,) int64, position of each sequence's next token
    cache_tokens: torch.Tensor  # (L, B, H_kv) tokens a head keeps after each eviction
    window: int  # W, slots freed by one multi-step eviction (0: never evicts)
    filled: np.ndarray  # (L, B) int64 host counters: tokens each sequence wrote past its cache
    memory: dict[str, torch.Tensor]  # the policy's per-call statistics (Policy.bind)
    quest: QuestSparsity | None = None
    prefill_seconds: float = 0.0
    kept_after_prefill: torch.Tensor | None = None  # (L, B, H_kv)
    # per layer, the (B, H_q, D) queries of the decode steps whose statistics wait (settle)
    pending: list[list[torch.Tensor]] = field(default_factory=list)

    def clone(self) -> DecodeState:
        """An independent copy (a compressed context answers many questions from one prefill)."""
        return copy.deepcopy(self)


class Engine:
    """Runs a loaded model with an eviction policy over a preallocated arena."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: ModelConfig,
        policy: Policy,
        *,
        budget: Budget | None = None,
        quest: QuestOptions | None = None,
        prefill_chunk: int = 512,
        layer_capacities: bool = True,
        head_pages: bool = True,
    ) -> None:
        """`layer_capacities` (default): after prefill, each layer's arena keeps only its own
        largest head plus the decode window (`KVArena.shrink_layers`), instead of every layer
        the size of the model's largest head: what a `pyramid` selection needs to cost about its
        budget. False keeps one capacity for every layer. `head_pages` (default, with
        `layer_capacities` and without Quest): a layer whose heads kept different counts (a
        `layer`/`global` selection) gives each head its own pages (`KVArena.pack_heads`), so
        that a head costs what it holds, not what the layer's largest head holds."""
        self.model, self.cfg, self.policy = model, cfg, policy
        self.layer_capacities, self.head_pages = layer_capacities, head_pages
        self.budget = budget or Budget(1.0)
        self.quest = quest
        self.eviction = EvictionStage(policy, self.budget, cfg.num_layers)
        self.prefill_chunk = prefill_chunk
        self.scale = cfg.head_dim**-0.5
        first = next(model.parameters())
        self.device, self.kv_dtype = first.device, kv_dtype(model)  # the arena's dtype
        self._grams: list[torch.Tensor] | None = None
        self.last_report: CacheReport | None = None
        self.clock: StepClock = STOPPED  # a running StepClock times the phases of decode steps

    def probes(self, tokenizer: Tokenizer, prompts: list[list[int]]) -> list[Probe] | None:
        """KVzip's probe of every prompt when the policy observes "repeat", else None: what
        `start` wants as `probes`."""
        if self.policy.options.observe != "repeat":
            return None
        return [self.probe(tokenizer, prompt) for prompt in prompts]

    def probe(
        self, tokenizer: Tokenizer, prompt: list[int], held: list[int] | None = None
    ) -> Probe:
        """KVzip's probe of one prompt with the policy's sinks, inside the model's context;
        of its `held` positions only when given (`repeat_probe`)."""
        sinks, context = self.policy.options.sinks, self.cfg.max_position_embeddings
        return repeat_probe(tokenizer, prompt, sinks=sinks, context=context, held=held)

    def check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Raises InputError for an empty prompt or one that leaves no room in the context."""
        context = self.cfg.max_position_embeddings
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise InputError(f"prompt {index} is empty: give at least one token of text")
            if len(prompt) + max_new_tokens > context:
                raise InputError(
                    f"prompt {index} has {len(prompt)} tokens and {max_new_tokens} new tokens "
                    f"were asked for, but the model's context is {context} tokens: shorten the "
                    "prompt or lower max_new_tokens"
                )

    @torch.inference_mode()
    def start(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        decode_window: int | None = None,
        records: list[PromptRecord] | None = None,
        probes: list[Probe | None] | None = None,
    ) -> tuple[DecodeState, torch.Tensor]:
        """Allocates the arena and prefills every prompt. Returns the state and (B, vocab) logits
        of each prompt's last token. `decode_window` overrides W; W >= max_new_tokens compresses
        the prompt once and evicts nothing while decoding (kvpress's setting). `records` (one
        per prompt, from `record_prompt`) replace the prompts' forward passes. `probes` (one per
        prompt, `nanokv.probe.repeat_probe`) are needed by, and only by, a policy that observes
        "repeat"; with `records` the probe is the one recorded (`record_prompt(..., probe=)`),
        and passing `probes` as well is a ValueError."""
        self.eviction.seconds = 0.0  # this call's (a scheduler's requests share the counter)
        if records is None:
            return _drain(self.start_steps(prompts, max_new_tokens, decode_window, probes))
        self.check_prompts(prompts, max_new_tokens)
        if [r.prompt for r in records] != [list(p) for p in prompts]:
            raise ValueError("records must be the recorded passes of these prompts, in order")
        self._check_probes(prompts, records, probes)
        began = time.perf_counter()
        plans, window, capacity, memory = self._begin(prompts, max_new_tokens, decode_window)
        arena = self._allocate(len(prompts), capacity)
        logits = [
            self._prefill_from_record(arena, seq, record, plans[seq])
            for seq, record in enumerate(records)
        ]
        return self._finish_start(
            arena, prompts, plans, window, decode_window, max_new_tokens, memory, logits, began
        )

    @torch.inference_mode()
    def start_steps(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        decode_window: int | None = None,
        probes: list[Probe | None] | None = None,
    ) -> Generator[None, None, tuple[DecodeState, torch.Tensor]]:
        """`start` as a generator that yields after every query chunk of every layer of every
        prompt's prefill and returns (state, logits): a scheduler runs a long prompt's prefill
        a chunk at a time between the decode steps of the running batch."""
        self.check_prompts(prompts, max_new_tokens)
        probes = self._check_probes(prompts, None, probes)
        began = time.perf_counter()
        plans, window, capacity, memory = self._begin(prompts, max_new_tokens, decode_window)
        arena = self._allocate(len(prompts), capacity)
        # a plan that keeps everything reads no score: its probe is skipped
        probes = [None if p.keep_all else probe for p, probe in zip(plans, probes, strict=True)]
        logits = []
        for seq, ids in enumerate(prompts):
            steps = self.prefill_steps(arena, seq, ids, plans[seq], probe=probes[seq])
            logits.append((yield from _bound(steps, self.policy, memory)))
        return self._finish_start(
            arena, prompts, plans, window, decode_window, max_new_tokens, memory, logits, began
        )

    def arena_capacity(
        self, prompts: list[list[int]], max_new_tokens: int, decode_window: int | None = None
    ) -> int:
        """Slots a (layer, kv head) of the arena that `start` allocates for these prompts: its
        largest size, before the arena shrinks to what decoding needs."""
        plans = [self.eviction.plan(len(p), max_new_tokens) for p in prompts]
        return self._capacity(plans, self._decode_window(plans, decode_window), max_new_tokens)

    def decode_capacities(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Per layer, the slots a head of this prompt's arena is planned to hold while it
        decodes (its count plus W), known before prefill: exact for uniform and pyramid
        allocations, the mean head for `layer`/`global`, whose heads' sizes prefill decides."""
        plan = self.eviction.plan(len(prompt), max_new_tokens)
        total = len(prompt) + max_new_tokens
        if plan.keep_all:
            return [total] * self.cfg.num_layers
        window = self._decode_window([plan], None)
        return [min(count + window, total) for count in plan.layer_counts]

    @property
    def defers_statistics(self) -> bool:
        """True when the policy's decode statistics can wait for the next eviction (`settle`):
        it needs emitted statistics and not at every step. Quest's sparse steps still emit."""
        policy = self.policy
        emit = policy.needs_decode_mass or policy.needs_value_norms
        return emit and policy.decode_statistics != "every step"

    def deferred_bytes(self, max_new_tokens: int = DEFERRED_STEPS, batch: int = 1) -> int:
        """The most bytes of queries a decode of `max_new_tokens` steps keeps for its deferred
        statistics (`settle`): (B, H_q, D) a layer for up to DEFERRED_STEPS steps, for a policy
        that defers them (not under Quest, which emits every step). A request's memory besides
        its arena."""
        cfg = self.cfg
        if not self.defers_statistics or self.quest is not None:
            return 0
        steps = min(DEFERRED_STEPS, max_new_tokens)
        element = torch.empty((), dtype=self.kv_dtype).element_size()
        return steps * cfg.num_layers * batch * cfg.num_heads * cfg.head_dim * element

    def arena_bytes(self, capacity: int | list[int], batch: int = 1) -> int:
        """Bytes of an arena of `capacity` slots a head (what `_allocate` would make), or of
        one with a capacity per layer (`KVArena.shrink_layers`)."""
        cfg = self.cfg
        layers = [capacity] * cfg.num_layers if isinstance(capacity, int) else capacity
        return sum(
            KVArena.bytes_for(
                1,
                batch,
                cfg.num_kv_heads,
                slots,
                cfg.head_dim,
                element_size=torch.empty((), dtype=self.kv_dtype).element_size(),
                q_heads=cfg.num_heads if self.policy.needs_value_norms else None,
                slot_state=len(self.policy.slot_state),
            )  # fmt: skip
            for slots in layers
        )

    def _decode_window(self, plans: list[SequencePlan], decode_window: int | None) -> int:
        if all(p.keep_all for p in plans):
            return 0
        return decode_window or self._window(plans)

    def _capacity(self, plans: list[SequencePlan], window: int, max_new_tokens: int) -> int:
        return max(
            min(p.head_cap + window, p.prompt_length + max_new_tokens) + self._extra_slot(p)
            for p in plans
        )

    def _extra_slot(self, plan: SequencePlan) -> int:
        """1 when prefill writes a reconstructed slot after every head's kept tokens (AUV, a
        layer that evicts): a head that kept its whole prompt then holds the prompt plus one."""
        counts = plan.layer_counts
        return int(self.eviction.reconstructs and plan.prompt_length > min(counts))

    def _begin(
        self, prompts: list[list[int]], max_new_tokens: int, decode_window: int | None
    ) -> tuple[list[SequencePlan], int, int, dict[str, torch.Tensor]]:
        """Plans, W, the arena's capacity and the policy's fresh per-call memory."""
        plans = [self.eviction.plan(len(p), max_new_tokens) for p in prompts]
        memory: dict[str, torch.Tensor] = {}
        self.policy.bind(memory, batch=len(prompts))
        window = self._decode_window(plans, decode_window)
        return plans, window, self._capacity(plans, window, max_new_tokens), memory

    def _finish_start(
        self,
        arena: KVArena,
        prompts: list[list[int]],
        plans: list[SequencePlan],
        window: int,
        decode_window: int | None,
        max_new_tokens: int,
        memory: dict[str, torch.Tensor],
        logits: list[torch.Tensor],
        began: float,
    ) -> tuple[DecodeState, torch.Tensor]:
        fit_window = decode_window is None
        state = self._decode_state(arena, prompts, plans, window, fit_window, max_new_tokens)
        state.memory = memory
        state.prefill_seconds = time.perf_counter() - began
        return state, torch.cat(logits)

    def _check_probes(
        self,
        prompts: list[list[int]],
        records: list[PromptRecord] | None,
        probes: list[Probe | None] | None,
    ) -> list[Probe | None]:
        """One probe (or None) per prompt, checked against the policy: a "repeat" policy needs
        one for every prompt (live or recorded), a "last" policy takes none, and a probe must
        stay inside the model's context."""
        repeat = self.policy.options.observe == "repeat"
        if records is not None:
            if probes is not None:
                raise ValueError(
                    "records carry their probe: record it with record_prompt(prompt, probe=...) "
                    "instead of passing probes= to start"
                )
            if repeat and any(r.probe is None for r in records):
                raise ValueError("observe='repeat' needs records made with a probe")
            return [None] * len(prompts)
        probes = [None] * len(prompts) if probes is None else list(probes)
        if len(probes) != len(prompts):
            raise ValueError(f"{len(probes)} probes for {len(prompts)} prompts: give one each")
        if repeat and any(probe is None for probe in probes):
            raise ValueError(
                f"policy {self.policy.name!r} observes 'repeat': give a probe for every prompt "
                "(nanokv.probe.repeat_probe, as nanokv.LLM does)"
            )
        if not repeat and any(probe is not None for probe in probes):
            raise ValueError(
                f"policy {self.policy.name!r} observes 'last' and would not read the probe: "
                "use observe='repeat' or pass no probes"
            )
        for index, (prompt, probe) in enumerate(zip(prompts, probes, strict=True)):
            self._check_probe_fits(index, prompt, probe)
        return probes

    def _check_probe_fits(self, index: int, prompt: list[int], probe: Probe | None) -> None:
        """InputError when a probe segment would run past the model's context."""
        context = self.cfg.max_position_embeddings
        if probe is not None and len(prompt) + probe.longest > context:
            raise InputError(
                f"prompt {index} has {len(prompt)} tokens and its probe runs {probe.longest} "
                f"more, past the model's {context}-token context: shorten the prompt or the "
                "probe's span, or use observe='last'"
            )

    def _decode_state(
        self,
        arena: KVArena,
        prompts: list[list[int]],
        plans: list[SequencePlan],
        window: int,
        fit_window: bool,
        max_new_tokens: int,
    ) -> DecodeState:
        """The state after prefill: per-head cache sizes, the final W, the arena shrunk to what
        decoding needs, host-side window counters, Quest's page bounds."""
        cache = torch.stack(
            [
                self.eviction.cache_tokens(plan, arena.lengths[:, seq])
                for seq, plan in enumerate(plans)
            ],
            dim=1,
        )  # (L, B, H_kv)
        if fit_window:
            window = self._fit_window(window, cache, plans)
        total = torch.tensor(
            [
                len(p) + max_new_tokens + self._extra_slot(plan)
                for p, plan in zip(prompts, plans, strict=True)
            ],
            device=self.device,
        )
        needed = torch.minimum(cache + window, total.view(1, -1, 1))  # (L, B, H_kv)
        if self.layer_capacities and self.head_pages and self.quest is None:
            arena.pack_heads(needed)
        elif self.layer_capacities:
            arena.shrink_layers(needed.amax(dim=(1, 2)).tolist())
        else:
            arena.shrink(int(needed.max()))
        filled = (arena.lengths[:, :, 0] - cache[:, :, 0]).cpu().numpy()  # same for every head
        positions = torch.tensor([len(p) for p in prompts], device=self.device)
        state = DecodeState(arena, positions, cache, window, filled, memory={})
        state.kept_after_prefill = arena.lengths.clone()
        if self.quest is not None:
            state.quest = QuestSparsity(self.quest, self.cfg.num_layers, max(map(len, prompts)))
            for layer in range(self.cfg.num_layers):
                state.quest.refresh(arena, layer)
        return state

    def _window(self, plans: list[SequencePlan]) -> int:
        """W: the configured decode window, no larger than the evictable (non-sink) part of
        the smallest cache, at least 1."""
        smallest = min(min(p.layer_counts) for p in plans if not p.keep_all)
        evictable = smallest - self.policy.options.sinks - int(self.policy.reconstructs)
        return max(1, min(self.policy.options.decode_window, evictable))

    def _fit_window(self, window: int, cache: torch.Tensor, plans: list[SequencePlan]) -> int:
        """Shrinks W to what the smallest head really kept (layer and global allocations give
        heads different sizes), so that an eviction never has to take a sink."""
        evicting = [seq for seq, plan in enumerate(plans) if not plan.keep_all]
        if not evicting or window == 0:
            return window
        reserved = self.policy.options.sinks + int(self.policy.reconstructs)
        smallest = int(cache[:, evicting].min()) - reserved
        return max(1, min(window, smallest))

    def _allocate(self, batch: int, capacity: int) -> KVArena:
        cfg = self.cfg
        q_heads = cfg.num_heads if self.policy.needs_value_norms else None
        return KVArena(
            cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim,
            dtype=self.kv_dtype, device=self.device, q_heads=q_heads,
            slot_state=self.policy.slot_state,
        )  # fmt: skip

    @torch.inference_mode()
    def prefill(
        self,
        arena: KVArena,
        seq: int,
        prompt: list[int],
        plan: SequencePlan | None = None,
        all_logits: bool = False,
        probe: Probe | None = None,
    ) -> torch.Tensor:
        """Runs one prompt layer by layer, leaving the kept K/V in the arena's row `seq` (None
        plan: keep everything), with the `probe`'s segments after it in every layer. Returns
        (1, vocab) logits of the last token, or (n, vocab) with `all_logits`."""
        return _drain(self.prefill_steps(arena, seq, prompt, plan, all_logits, probe))

    @torch.inference_mode()
    def prefill_steps(
        self,
        arena: KVArena,
        seq: int,
        prompt: list[int],
        plan: SequencePlan | None = None,
        all_logits: bool = False,
        probe: Probe | None = None,
    ) -> Generator[None, None, torch.Tensor]:
        """`prefill` as a generator that yields after each query chunk of each layer and returns
        the logits."""
        ids = torch.tensor(prompt, device=self.device)
        positions = torch.arange(len(prompt), device=self.device)
        h = self.model.embed(ids, positions)  # (n, hidden)
        run = self._probe_run(probe, len(prompt))
        for layer, block in enumerate(self.model.blocks):
            steps = self._prefill_layer_steps(layer, seq, block, h, positions, probe=run)
            prompt_layer = yield from steps
            self._keep_prompt_layer(arena, prompt_layer, plan)
            yield
        if plan is not None:
            information = None
            if self.eviction.weighs_information(plan):
                information = token_information(self.model.logits, h, ids)
            sentences = probe.sentence_of if probe is not None else ()
            self.eviction.finish_prefill(arena, seq, plan, information, sentences)
        return self.model.logits(h if all_logits else h[-1:])

    @torch.inference_mode()
    def record_prompt(self, prompt: list[int], probe: Probe | None = None) -> PromptRecord:
        """Runs one prompt's forward pass once and keeps every layer's K/V, queries and value
        norms (and, with a `probe`, its statistics): the pass does not depend on the policy, so
        `start(..., records=...)` can then fill the arena of any policy and budget from it (an
        evaluation grid prefills a case once). Holds all layers' prompt K/V and queries: for
        evaluation, not serving."""
        self._check_probe_fits(0, prompt, probe)
        ids = torch.tensor(prompt, device=self.device)
        positions = torch.arange(len(prompt), device=self.device)
        h = self.model.embed(ids, positions)  # (n, hidden)
        run = self._probe_run(probe, len(prompt))
        layers = [
            _drain(self._prefill_layer_steps(layer, 0, block, h, positions, True, run))
            for layer, block in enumerate(self.model.blocks)
        ]
        return PromptRecord(list(prompt), layers, self.model.logits(h[-1:]), probe, h)

    def _probe_run(self, probe: Probe | None, n: int) -> _ProbeRun | None:
        """The probe's segments embedded at positions n, n+1, ... (each segment restarts there:
        no segment sees another)."""
        if probe is None:
            return None
        positions = torch.arange(n + probe.longest, device=self.device)
        hidden = [
            self.model.embed(
                torch.tensor(segment.ids, device=self.device), positions[n : n + len(segment.ids)]
            )
            for segment in probe.segments
        ]
        return _ProbeRun(probe, positions, hidden)

    def _prefill_from_record(
        self, arena: KVArena, seq: int, record: PromptRecord, plan: SequencePlan
    ) -> torch.Tensor:
        """What `prefill` does, with the layers' statistics taken from a recorded pass."""
        for recorded in record.layers:
            self._keep_prompt_layer(arena, self._as_policy_sees(recorded, seq), plan)
        information = None
        if self.eviction.weighs_information(plan):
            information = record.information(self.model.logits)
        sentences = record.probe.sentence_of if record.probe is not None else ()
        self.eviction.finish_prefill(arena, seq, plan, information, sentences)
        return record.logits.clone()

    def _as_policy_sees(self, recorded: PromptLayer, seq: int) -> PromptLayer:
        """A recorded layer reduced to what a live prefill gives this engine's policy."""
        queries = recorded.queries  # (H_q, n, D): every prompt query
        n = queries.shape[1]
        window = min(self.policy.options.observation_window, n) or 1
        policy = self.policy
        repeat = policy.options.observe == "repeat"
        return replace(
            recorded,
            seq=seq,
            window_queries=queries[:, n - window :],
            queries=queries if policy.needs_all_queries else None,
            value_norms=recorded.value_norms if policy.needs_value_norms else None,
            o_proj_weight=recorded.o_proj_weight if policy.needs_value_norms else None,
            probe_attention=recorded.probe_attention if repeat else None,
            probe_output_norm=recorded.probe_output_norm if repeat else None,
        )

    def _keep_prompt_layer(
        self, arena: KVArena, prompt_layer: PromptLayer, plan: SequencePlan | None
    ) -> None:
        """The eviction stage of prefill: the policy scores, the selection keeps the best, and
        only the kept K/V reach the arena."""
        chosen = None if plan is None else self.eviction.select_prefill(prompt_layer, plan)
        arena.fill(
            prompt_layer.layer, prompt_layer.seq, prompt_layer.k, prompt_layer.v,
            prompt_layer.positions,
            kept=None if chosen is None else chosen.kept,
            counts=None if chosen is None else chosen.counts,
            value_norms=prompt_layer.value_norms,
            scores=None if chosen is None else chosen.scores,
            state=None if chosen is None else chosen.state,
        )  # fmt: skip
        if chosen is not None:
            self.eviction.after_fill(arena, prompt_layer, plan, chosen)

    def _prefill_layer_steps(
        self,
        layer: int,
        seq: int,
        block: torch.nn.Module,
        h: torch.Tensor,
        positions: torch.Tensor,
        every_statistic: bool = False,
        probe: _ProbeRun | None = None,
    ) -> Generator[None, None, PromptLayer]:
        """Runs `block` over the prompt in query chunks, updating h (n, hidden) in place, then
        over the `probe`'s segments; yields after every chunk but the last (a scheduler's decode
        steps then wait for one chunk of a long prompt, not a layer) and returns the layer as
        the policy sees it. `every_statistic` keeps what any policy could read (all queries,
        value norms)."""
        n, cfg = h.shape[0], self.cfg
        extra = 0 if probe is None else probe.probe.longest
        # the document's K/V, then the probe's
        k_all = h.new_empty(n + extra, cfg.num_kv_heads, cfg.head_dim, dtype=self.kv_dtype)
        v_all = torch.empty_like(k_all)
        window = min(self.policy.options.observation_window, n) or 1
        window_queries = h.new_empty(window, cfg.num_heads, cfg.head_dim, dtype=self.kv_dtype)
        all_queries = None
        if self.policy.needs_all_queries or every_statistic:
            all_queries = h.new_empty(n, cfg.num_heads, cfg.head_dim, dtype=self.kv_dtype)
        for start in range(0, n, self.prefill_chunk):
            end = min(start + self.prefill_chunk, n)
            q, k_all[start:end], v_all[start:end] = block.qkv(h[start:end], positions[start:end])
            attn = prefill_attention(
                q, k_all[:end], v_all[:end], positions[start:end], positions[:end],
                scale=self.scale, sliding_window=cfg.sliding_window,
            )  # fmt: skip
            h[start:end] = block.finish(h[start:end], attn)
            _keep_window_queries(window_queries, q, start, end, n)
            if all_queries is not None:
                all_queries[start:end] = q
            if end < n:
                yield
        needs_norms = self.policy.needs_value_norms or every_statistic
        scores = None
        if probe is not None:
            scores = self._probe_layer(block, k_all, v_all, probe, output=needs_norms)
        k_all, v_all = k_all[:n], v_all[:n]  # the probe's K/V end here: never in the arena
        return PromptLayer(
            layer=layer,
            seq=seq,
            k=k_all.transpose(0, 1),
            v=v_all.transpose(0, 1),
            positions=positions,
            window_queries=window_queries.transpose(0, 1),
            scale=self.scale,
            sliding_window=cfg.sliding_window,
            queries=None if all_queries is None else all_queries.transpose(0, 1),
            value_norms=self._value_norms(layer, v_all.transpose(0, 1), every_statistic),
            o_proj_weight=block.o_proj.weight if needs_norms else None,
            probe_attention=None if scores is None else scores.attention,
            probe_output_norm=None if scores is None else scores.output_norm(),
        )

    def _probe_layer(
        self,
        block: torch.nn.Module,
        k_all: torch.Tensor,
        v_all: torch.Tensor,
        run: _ProbeRun,
        output: bool,
    ) -> ProbeScores:
        """Runs `block` over each probe segment in query chunks after the document, whose K/V
        fill k_all, v_all (n + longest, H_kv, D) up to n; each segment writes its K/V after them
        (overwriting the previous segment's), attends to the document and to itself, and leaves
        only its running scores. Updates the segments' hidden states in place."""
        n = k_all.shape[0] - run.probe.longest
        pos, chunk = run.positions, self.prefill_chunk
        scores = ProbeScores(
            self.cfg.num_heads, n, self.device, sinks=run.probe.sinks, output=output
        )
        for segment, h in zip(run.probe.segments, run.hidden, strict=True):
            for start in range(0, h.shape[0], chunk):
                end = min(start + chunk, h.shape[0])
                rows = slice(n + start, n + end)
                q, k_all[rows], v_all[rows] = block.qkv(h[start:end], pos[rows])
                attn = scores.attend_rows(
                    q, k_all[: n + end], v_all[: n + end], pos[: n + end], segment,
                    scale=self.scale, sliding_window=self.cfg.sliding_window,
                )  # fmt: skip
                scores.add_output(attn, block.o_proj.weight)
                h[start:end] = block.finish(h[start:end], attn)
        return scores

    def _value_norms(
        self, layer: int, v: torch.Tensor, always: bool = False
    ) -> torch.Tensor | None:
        """||v_j W_O^h|| (..., H_q, T) for values v (..., H_kv, T, D), when the policy reads them
        (or `always`). The Gram matrices G_h = W_O^h W_O^h^T are computed once per engine."""
        if not (self.policy.needs_value_norms or always):
            return None
        if self._grams is None:
            cfg = self.cfg
            self._grams = [
                output_gram(block.o_proj.weight, cfg.num_heads, cfg.head_dim)
                for block in self.model.blocks
            ]
        return value_output_norms(v, self._grams[layer])

    @torch.inference_mode()
    def step(
        self,
        state: DecodeState,
        tokens: torch.Tensor,
        capture: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Feeds one token per sequence (B,) and returns the next-token logits (B, vocab).
        `capture` (a list) receives each layer's attention output (B, H_q * D), for fidelity
        measurements."""
        clock, positions = self.clock, state.positions
        clock.start()
        h = self.model.embed(tokens, positions)  # (B, hidden)
        self.policy.bind(state.memory)
        for layer, block in enumerate(self.model.blocks):
            q, k, v = block.qkv(h, positions)  # (B, H_q, D), (B, H_kv, D), (B, H_kv, D)
            clock.mark("model")
            out = self.attend_layer(state, layer, q, k, v)
            if capture is not None:
                capture.append(out.reshape(h.shape[0], -1).float().clone())
            h = block.finish(h, out.reshape(h.shape[0], -1))
            clock.mark("model")
        state.positions += 1
        logits = self.model.logits(h)
        clock.mark("lm head")
        return logits

    def attend_layer(
        self, state: DecodeState, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """One layer of a decode step for the state's batch at `state.positions`: the eviction
        stage (a full window frees W slots before the write), the write, attention (Quest's
        pages where sparse), the policy's observation. q (B, H_q, D), k and v (B, H_kv, D) ->
        (B, H_q, D). The policy must be bound to `state.memory`.

        A policy that only adds up its statistics or keeps the latest (`decode_statistics`)
        gets them at the next eviction instead, for all the steps since in one batched pass
        (`settle`): on CPU the emission of a single query costs a dozen small ops a layer,
        about as much as the attention itself, and a window of W steps then pays them once."""
        positions, arena, quest, clock = state.positions, state.arena, state.quest, self.clock
        emit = self.policy.needs_decode_mass or self.policy.needs_value_norms
        defer = quest is None and self.defers_statistics
        if defer and len(self._pending(state)[layer]) >= DEFERRED_STEPS:
            self._settle_layer(state, layer)
        self._evict_if_full(state, layer)
        clock.mark("eviction")
        norms = None if defer else self._value_norms(layer, v.unsqueeze(-2))  # (B, H_q, 1)
        clock.mark("value norms")
        slots = arena.append(layer, k, v, positions, None if norms is None else norms[..., 0])
        view, emit = arena.layer(layer), emit and not defer
        clock.mark("arena write")
        if isinstance(view, PackedLayerView) and not emit:
            out, emitted = self._attend_packed(view, q, positions), None
        else:
            attention = dict(
                scale=self.scale, slot_pos=view.pos, query_pos=positions,
                sliding_window=self.cfg.sliding_window, value_norms=view.value_norms, emit=emit,
            )  # fmt: skip
            if quest is not None and quest.is_sparse(layer):
                quest.written(arena, layer, slots)
                out, emitted = quest.attend(layer, q, arena, **attention)
            else:
                out, emitted = decode_attention(q, view.k, view.v, view.lengths, **attention)
        clock.mark("attention + emission" if emit else "attention")
        if defer:
            state.pending[layer].append(q)
        else:
            self.eviction.write_rows(arena, layer, self.policy.observe_decode(layer, view, emitted))
        clock.mark("observation")
        return out

    def _attend_packed(
        self, view: PackedLayerView, q: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Attention over a packed layer where its pages lie (no rectangle gathered)."""
        return packed_decode_attention(
            q, view.flat_k, view.flat_v, view.flat_pos, view.pages, scale=self.scale,
            query_pos=positions, sliding_window=self.cfg.sliding_window,
        )  # fmt: skip

    @torch.inference_mode()
    def settle(self, state: DecodeState) -> None:
        """Brings every slot statistic of the state up to date: the deferred decode steps of
        every layer (see `attend_layer`) are emitted and observed. Anything that reads or moves
        the arena's statistics other than a decode step calls it first."""
        self.policy.bind(state.memory)
        for layer in range(len(state.pending)):
            self._settle_layer(state, layer)

    def _pending(self, state: DecodeState) -> list[list[torch.Tensor]]:
        if not state.pending:
            state.pending = [[] for _ in range(self.cfg.num_layers)]
        return state.pending

    def _settle_layer(self, state: DecodeState, layer: int) -> None:
        """The deferred steps of one layer, between two decode steps: step t of n wrote the
        token at slot `length - (n - t)` of each head and saw the slots before it, at query
        position `positions - (n - t)`; their value norms, then their summed statistics, are
        computed in one pass each and observed as one step (the last step only, for a policy
        that keeps only the latest statistics; step by step in one call for a "stepwise" one)."""
        queries = state.pending[layer] if state.pending else []
        if not queries:
            return
        self.clock.mark("eviction")  # what ran before, in the step that settles
        state.pending[layer] = []
        arena, steps = state.arena, len(queries)
        back = torch.arange(steps, 0, -1, device=self.device)  # n - t for t = 0 .. n - 1
        lengths = arena.lengths[layer].unsqueeze(1) - (back - 1).view(1, -1, 1)  # (B, n, H_kv)
        if self.policy.needs_value_norms:
            self._write_value_norms(arena, layer, lengths.transpose(1, 2) - 1)
        if self.policy.decode_statistics == "last":
            queries, back, lengths = queries[-1:], back[-1:], lengths[:, -1:]
        view, stepwise = arena.layer(layer), self.policy.decode_statistics == "stepwise"
        window, queries = self.cfg.sliding_window, torch.stack(queries, dim=1)
        emitted = None
        if not stepwise and window is None and self.device.type == "cpu":
            emitted = self._emitted_in_c(arena, layer, queries, lengths)
        if emitted is None:
            emitted = emitted_over_steps(
                queries, view.k, lengths, scale=self.scale,
                slot_pos=None if window is None else view.pos,  # a packed layer gathers it
                query_pos=state.positions.unsqueeze(1) - back, sliding_window=window,
                value_norms=view.value_norms, summed=not stepwise,
            )  # fmt: skip
        if stepwise:
            rows = self.policy.observe_steps(layer, view, emitted, lengths)
        else:
            rows = self.policy.observe_decode(layer, view, emitted)
        self.eviction.write_rows(arena, layer, rows)
        self.clock.mark("deferred statistics")

    def _emitted_in_c(
        self, arena: KVArena, layer: int, queries: torch.Tensor, lengths: torch.Tensor
    ) -> Emitted | None:
        """`emitted_over_steps` summed, from the C kernel reading the layer where it lies (a
        packed layer is not gathered); None where the kernel does not apply."""
        rows = arena.row_offsets(layer)
        norms = None if rows.norms is None else (rows.norms, rows.norm_base, rows.norm_stride)
        summed = cpu_emit_over_steps(
            queries, rows.keys, rows.key_base, lengths, rows.width, self.scale, norms
        )
        return None if summed is None else Emitted(*summed)

    def _write_value_norms(self, arena: KVArena, layer: int, slots: torch.Tensor) -> None:
        """||v_j W_O^h|| of the values at `slots` (B, H_kv, n), into the arena's value norms."""
        values = arena.values_at(layer, slots)  # (B, H_kv, n, D)
        arena.write_value_norms(layer, slots, self._value_norms(layer, values))

    def _evict_if_full(self, state: DecodeState, layer: int) -> None:
        """Runs a multi-step eviction for the sequences whose decode window is full. The check
        uses host-side counters, so the decode loop never waits on the device for it."""
        counts = state.filled[layer]  # (B,) a view of the host counters
        if state.window == 0:  # never evicts while decoding
            counts += 1
            return
        full = counts >= state.window
        if not full.any():
            counts += 1
            return
        self._settle_layer(state, layer)
        self.eviction.evict(
            state.arena,
            layer,
            state.cache_tokens[layer],
            state.window,
            torch.from_numpy(full).to(self.device),
        )
        counts[full] = 0
        counts += 1
        if state.quest is not None:
            state.quest.refresh(state.arena, layer)

    @torch.inference_mode()
    def extend(
        self, state: DecodeState, tokens: list[int], trail: InformationTrail | None = None
    ) -> torch.Tensor:
        """Feeds `tokens` to every sequence of the state (teacher forcing), e.g. a question after
        a compressed context. Returns the last (B, vocab) logits. When no eviction can fall
        inside the tokens (a compressed context reserves room for them), they run as one chunk
        against the arena; otherwise one decode step each, evicting as decode does. A `trail`
        (one sequence) records the tokens' self-information."""
        if not tokens:
            raise InputError("nothing to extend the context with: the question is empty")
        context = self.cfg.max_position_embeddings
        if int(state.positions.max()) + len(tokens) > context:
            raise InputError(f"context and question exceed the model's {context} tokens")
        if self._fits_without_eviction(state, len(tokens)):
            return self._extend_chunk(state, tokens, trail)
        batch = state.positions.shape[0]
        for token in tokens:
            logits = self.step(state, torch.full((batch,), token, device=self.device))
            if trail is not None:
                trail.step_written(token, logits)
        return logits

    def _fits_without_eviction(self, state: DecodeState, count: int) -> bool:
        arena = state.arena
        room = min(arena.room(layer) for layer in range(self.cfg.num_layers))
        no_eviction = state.window == 0 or int(state.filled.max()) + count <= state.window
        return count <= room and no_eviction

    @torch.inference_mode()
    def _extend_chunk(
        self, state: DecodeState, tokens: list[int], trail: InformationTrail | None = None
    ) -> torch.Tensor:
        """Writes the tokens' K/V into the arena and attends to it causally, layer by layer.
        Policy statistics are not updated by these tokens (no eviction follows them before the
        window refills), and attention is dense even under Quest."""
        self.settle(state)  # the deferred steps assume one token a step
        batch, m = state.positions.shape[0], len(tokens)
        positions = state.positions.unsqueeze(1) + torch.arange(m, device=self.device)  # (B, m)
        ids = torch.tensor(tokens, device=self.device).repeat(batch)
        h = self.model.embed(ids, positions.flatten())  # (B * m, hidden)
        arena = state.arena
        for layer, block in enumerate(self.model.blocks):
            q, k, v = block.qkv(h, positions.flatten())  # rows: (B * m, heads, D)
            first_slot = arena.lengths[layer].clone()
            norms = self._value_norms(layer, v.view(batch, m, *v.shape[1:]).transpose(1, 2))
            for j in range(m):
                row = slice(j, None, m)  # token j of every sequence
                norm = None if norms is None else norms[..., j]
                arena.append(layer, k[row], v[row], positions[:, j], norm)
            view = arena.layer(layer)
            attn = arena_chunk_attention(
                q.view(batch, m, *q.shape[1:]), view.k, view.v, first_slot, scale=self.scale,
                slot_pos=view.pos, query_positions=positions,
                sliding_window=self.cfg.sliding_window,
            )  # fmt: skip
            h = block.finish(h, attn.reshape(batch * m, -1))
            if state.quest is not None:
                state.quest.refresh(arena, layer)
        state.positions += m
        state.filled += m
        if trail is not None:
            return trail.chunk_written(ids[:m], h[:m], self.model.logits)
        return self.model.logits(h.view(batch, m, -1)[:, -1])

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        stopper: StopChecker,
        on_text: TextCallback | None = None,
        probes: list[Probe | None] | None = None,
    ) -> list[Sequence]:
        """Generates for every prompt until EOS, a stop string, or max_new_tokens (`probes`:
        as for `start`)."""
        state, logits = self.start(prompts, params.max_new_tokens, probes=probes)
        sequences = self.decode(state, logits, prompts, params, stopper, on_text)
        self.last_report = self.report(state, prompts, params.max_new_tokens)
        return sequences

    def decode(
        self,
        state: DecodeState,
        logits: torch.Tensor,
        prompts: list[list[int]],
        params: SamplingParams,
        stopper: StopChecker,
        on_text: TextCallback | None = None,
    ) -> list[Sequence]:
        """The decode loop from next-token `logits` (B, vocab): sample, stop, step."""
        sequences = [Sequence(list(p)) for p in prompts]
        sampler = Sampler(params, len(prompts), self.device)
        for step in range(params.max_new_tokens):
            tokens = sampler(logits)
            last = step + 1 == params.max_new_tokens
            for index, seq in enumerate(sequences):
                if seq.finish_reason is None:
                    delta = stopper.advance(seq, int(tokens[index]), last)
                    if delta and on_text is not None:
                        on_text(index, delta)
            if all(seq.finish_reason is not None for seq in sequences):
                break
            logits = self.step(state, tokens)
        return sequences

    # --- a live arena (a conversation): appended to, then compressed back to a budget --------

    def empty_state(self, capacity: int) -> DecodeState:
        """One sequence's empty arena of `capacity` slots that never evicts while it decodes
        (W = 0): its owner appends with `extend` and `step` and compresses it with `recompress`
        (nanokv/conversation.py)."""
        layers, kv_heads = self.cfg.num_layers, self.cfg.num_kv_heads
        arena = self._allocate(1, capacity)
        memory: dict[str, torch.Tensor] = {}
        self.policy.bind(memory, batch=1)
        cache = torch.zeros(layers, 1, kv_heads, dtype=torch.long, device=self.device)
        positions = torch.zeros(1, dtype=torch.long, device=self.device)
        filled = np.zeros((layers, 1), dtype=np.int64)  # on the host, as _decode_state's
        state = DecodeState(arena, positions, cache, 0, filled, memory)
        state.kept_after_prefill = arena.lengths.clone()
        return state

    @torch.inference_mode()
    def recompress(
        self,
        state: DecodeState,
        cache: int,
        probe: Probe | None = None,
        information: torch.Tensor | None = None,
        memory: TurnMemory | None = None,
    ) -> None:
        """Brings a one-sequence arena back to `cache` slots a (layer, kv head) on average
        under the policy's allocation (`EvictionStage.reselect`), ranked by the policy's own
        scoring of KVzip's `probe` run against the arena (`probe_arena`) or, without one, by
        its `eviction_scores`; the sinks and the policy's observation window (the last
        positions seen) are protected; `information` (positions seen,) multiplies each slot's
        score by its token's self-information (a conversation's `InformationTrail`). With a
        turn `memory` and a probe, every head keeps the same whole turns and latest tokens
        instead (`EvictionStage.keep_turns`). Nothing is re-prefilled."""
        arena = state.arena
        self.settle(state)
        if int(arena.lengths.max()) <= cache:
            return
        began = time.perf_counter()
        if probe is None:
            layers = range(self.cfg.num_layers)
            scores = torch.stack(
                [self.policy.eviction_scores(layer, arena.layer(layer))[0] for layer in layers]
            )  # (L, H_kv, C)
        else:
            scores = self.probe_arena(state, probe)
        self.eviction.seconds += time.perf_counter() - began
        if information is not None:  # (positions seen,) self-information, by position
            scores = weigh(scores, arena.pos[:, 0], information)
        if memory is not None and probe is not None:
            self.eviction.keep_turns(arena, 0, scores, cache, memory, probe.sentence_of)
        else:
            self.eviction.reselect(arena, 0, scores, cache, int(state.positions[0]))

    @torch.inference_mode()
    def probe_arena(
        self, state: DecodeState, probe: Probe, chunk: int | None = None
    ) -> torch.Tensor:
        """The policy's score (L, H_kv, C) float32 of every slot of a one-sequence arena from
        KVzip's `probe` (nanokv/recompress.py): each segment runs through every layer at the
        positions after the arena's last token, in chunks of `chunk` rows (default: the prefill
        chunk), against the arena's slots and itself; the policy reduces what the rows saw
        (`Policy.score_probe`). The arena is only read: the probe's K/V are one layer's
        temporaries."""
        self.settle(state)
        cfg, arena = self.cfg, state.arena
        output = self.policy.needs_value_norms
        seen = [
            ProbeScores(cfg.num_heads, arena.capacity, self.device, sinks=0, output=output)
            for _ in range(cfg.num_layers)
        ]  # per layer: (H_q, C) max attention of the rows, and their output norms
        first = int(state.positions[0])
        for segment in probe.segments:
            positions = torch.arange(first, first + len(segment.ids), device=self.device)
            h = self.model.embed(torch.tensor(segment.ids, device=self.device), positions)
            for layer, block in enumerate(self.model.blocks):
                self._probe_arena_layer(
                    block, arena.layer(layer), h, positions, segment, probe.sinks,
                    seen[layer], chunk or self.prefill_chunk,
                )  # fmt: skip
        return torch.stack(
            [self._probed_slots(arena, layer, seen[layer]) for layer in range(cfg.num_layers)]
        )

    def _probed_slots(self, arena: KVArena, layer: int, seen: ProbeScores) -> torch.Tensor:
        """(H_kv, C) the policy's scores of one layer's slots from what the probe saw."""
        norms = None if arena.value_norms is None else arena.value_norms[layer][0]
        keys = ProbedKeys(
            layer, 0, self.cfg.num_kv_heads, seen.attention, norms, seen.output_norm()
        )
        return self.policy.score_probe(keys)

    def _probe_arena_layer(
        self,
        block: torch.nn.Module,
        view: ArenaLayer,
        h: torch.Tensor,
        positions: torch.Tensor,
        segment: ProbeSegment,
        sinks: int,
        seen: ProbeScores,
        chunk: int,
    ) -> None:
        """Runs `block` over one probe segment h (m, hidden) in query chunks, updating h in
        place, and folds each chunk's slot attention (max) and output norms into `seen`."""
        m, cfg = h.shape[0], self.cfg
        # the segment's own K/V, this layer only
        own_k = h.new_empty(m, cfg.num_kv_heads, cfg.head_dim, dtype=self.kv_dtype)
        own_v = torch.empty_like(own_k)
        for start in range(0, m, chunk):
            end = min(start + chunk, m)
            q, own_k[start:end], own_v[start:end] = block.qkv(h[start:end], positions[start:end])
            attn, slot_attention = arena_probe_attention(
                q, view.k[0], view.v[0], view.pos[0], view.lengths[0], own_k[:end],
                own_v[:end], positions[:end], segment, sinks=sinks, scale=self.scale,
                sliding_window=cfg.sliding_window,
            )  # fmt: skip
            torch.maximum(seen.attention, slot_attention, out=seen.attention)
            seen.add_output(attn, block.o_proj.weight)
            h[start:end] = block.finish(h[start:end], attn)

    def report(self, state: DecodeState, prompts: list[list[int]], max_new: int) -> CacheReport:
        """What the call kept and what it cost."""
        cfg, element = self.cfg, state.arena.element_size
        per_head = sum(len(p) + max_new for p in prompts) * cfg.num_kv_heads * cfg.head_dim
        quest = state.quest
        return CacheReport(
            policy=self.policy.name + ("+quest" if quest is not None else ""),
            budget=[self.eviction.describe(len(p), max_new) for p in prompts],
            prompt_tokens=[len(p) for p in prompts],
            kept_after_prefill=state.kept_after_prefill,
            arena_bytes=state.arena.nbytes,
            full_cache_bytes=2 * cfg.num_layers * per_head * element,
            prefill_seconds=state.prefill_seconds,
            eviction_seconds=self.eviction.seconds,
            quest_read_fraction=quest.pages_read / max(quest.pages_held, 1) if quest else None,
        )


def _keep_window_queries(
    window_queries: torch.Tensor, q: torch.Tensor, start: int, end: int, n: int
) -> None:
    """Copies the rows of chunk q (start..end) that fall in the last `window` prompt positions."""
    window_start = n - window_queries.shape[0]
    first = max(start, window_start)
    if first < end:
        window_queries[first - window_start : end - window_start] = q[first - start : end - start]


def _drain(steps: Generator[None, None, object]):
    """Runs a step generator to its end and returns its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _bound(
    steps: Generator[None, None, torch.Tensor], policy: Policy, memory: dict[str, torch.Tensor]
) -> Generator[None, None, torch.Tensor]:
    """Binds `policy` to this call's `memory` before every step: between two steps a scheduler
    may run other requests' decode steps with the same policy bound to their own memory."""
    while True:
        policy.bind(memory)
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        yield
