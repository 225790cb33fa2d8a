"""The engine: prefill -> evict -> decode for a batch of token sequences.

This is the only place where models and eviction policies meet. Prefill runs one sequence at a
time and one layer at a time over the whole prompt (in query chunks), so that at most one layer's
prompt K/V exists outside the arena: after each layer the policy chooses the kept tokens and only
those are copied into the arena. Decode runs the batch together, one token per sequence, against
the arena through the decode-attention kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanokv.arena import KVArena
from nanokv.attention import prefill_attention
from nanokv.budget import Budget
from nanokv.config import ModelConfig
from nanokv.kernels.decode_attention import decode_attention
from nanokv.policies import Policy, PromptLayer
from nanokv.policies.selection import select_prompt_tokens, select_victims
from nanokv.sampling import Sampler, SamplingParams
from nanokv.stopping import StopChecker

TextCallback = Callable[[int, str], None]


class InputError(ValueError):
    """A request the engine cannot serve (empty prompt, prompt longer than the context...)."""


@dataclass
class Sequence:
    """One prompt's generation: its tokens, text and why it stopped."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


@dataclass
class DecodeState:
    """What the decode loop carries from step to step, in one object."""

    arena: KVArena
    positions: torch.Tensor  # (B,) int64, position of each sequence's next token
    cache_tokens: torch.Tensor  # (B,) int64, tokens a head keeps after each eviction
    limits: torch.Tensor  # (B,) int64, slots a head may fill before W of them are freed
    window: int  # W, slots freed by one multi-step eviction


class Engine:
    """Runs a loaded model with an eviction policy over a preallocated arena."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: ModelConfig,
        policy: Policy,
        *,
        budget: Budget | None = None,
        prefill_chunk: int = 512,
    ) -> None:
        self.model, self.cfg, self.policy = model, cfg, policy
        self.budget = budget or Budget(1.0)
        self.prefill_chunk = prefill_chunk
        self.scale = cfg.head_dim**-0.5
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype

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
        self, prompts: list[list[int]], max_new_tokens: int
    ) -> tuple[DecodeState, torch.Tensor]:
        """Allocates the arena and prefills every prompt. Returns the state and (B, vocab) logits
        of each prompt's last token."""
        self.check_prompts(prompts, max_new_tokens)
        cfg = self.cfg
        cache, limits, window = self._arena_plan([len(p) for p in prompts], max_new_tokens)
        arena = KVArena(
            cfg.num_layers, len(prompts), cfg.num_kv_heads, int(limits.max()), cfg.head_dim,
            dtype=self.dtype, device=self.device,
        )  # fmt: skip
        never_evicts = cache >= torch.tensor([len(p) + max_new_tokens for p in prompts])
        logits = torch.cat(
            [
                self.prefill(arena, seq, ids, None if never_evicts[seq] else int(cache[seq]))
                for seq, ids in enumerate(prompts)
            ]
        )
        positions = torch.tensor([len(p) for p in prompts], device=self.device)
        return DecodeState(arena, positions, cache, limits, window), logits

    def _arena_plan(self, lengths: list[int], max_new_tokens: int) -> tuple[torch.Tensor, ...]:
        """Per sequence: tokens kept after each eviction, slots before an eviction; and W."""
        total = torch.tensor([n + max_new_tokens for n in lengths], device=self.device)
        if not self.policy.evicts:
            return total, total, 0
        cache = torch.tensor(
            [self.budget.cache_tokens(n, max_new_tokens) for n in lengths], device=self.device
        )
        window = max(1, min(self.policy.options.decode_window, int(cache.min())))
        return cache, torch.minimum(cache + window, total), window

    @torch.inference_mode()
    def prefill(
        self,
        arena: KVArena,
        seq: int,
        prompt: list[int],
        cache_tokens: int | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Runs one prompt layer by layer, leaving the kept K/V in the arena's row `seq`
        (at most `cache_tokens` per head; None keeps all). Returns (1, vocab) logits of the last
        token, or (n, vocab) with `all_logits`."""
        ids = torch.tensor(prompt, device=self.device)
        positions = torch.arange(len(prompt), device=self.device)
        h = self.model.embed(ids, positions)  # (n, hidden)
        for layer, block in enumerate(self.model.blocks):
            prompt_layer = self._prefill_layer(layer, block, h, positions)
            # --- eviction stage (prefill): the policy scores, the selection keeps the best ---
            kept, scores = self._prefill_selection(prompt_layer, cache_tokens)
            arena.fill(layer, seq, prompt_layer.k, prompt_layer.v, positions, kept, scores=scores)
        return self.model.logits(h if all_logits else h[-1:])

    def _prefill_selection(
        self, prompt: PromptLayer, cache_tokens: int | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(kept (H_kv, m), scores (H_kv, n)); both None when the policy never evicts here."""
        n = prompt.positions.shape[0]
        if not self.policy.evicts or cache_tokens is None:
            return None, None
        scores = self.policy.prefill_scores(prompt)
        options = self.policy.options
        kept = select_prompt_tokens(
            scores, min(cache_tokens, n), sinks=options.sinks, window=options.observation_window
        )
        return kept, scores

    def _prefill_layer(
        self, layer: int, block: torch.nn.Module, h: torch.Tensor, positions: torch.Tensor
    ) -> PromptLayer:
        """Runs `block` over the prompt in query chunks, updating h (n, hidden) in place."""
        n, cfg = h.shape[0], self.cfg
        k_all = h.new_empty(n, cfg.num_kv_heads, cfg.head_dim)
        v_all = torch.empty_like(k_all)
        window = min(self.policy.options.observation_window, n) or 1
        window_queries = h.new_empty(window, cfg.num_heads, cfg.head_dim)
        all_queries = None
        if self.policy.needs_all_queries:
            all_queries = h.new_empty(n, cfg.num_heads, cfg.head_dim)
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
        return PromptLayer(
            layer=layer,
            k=k_all.transpose(0, 1),
            v=v_all.transpose(0, 1),
            positions=positions,
            window_queries=window_queries.transpose(0, 1),
            scale=self.scale,
            sliding_window=cfg.sliding_window,
            queries=None if all_queries is None else all_queries.transpose(0, 1),
        )

    @torch.inference_mode()
    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds one token per sequence (B,) and returns the next-token logits (B, vocab)."""
        positions = state.positions
        h = self.model.embed(tokens, positions)  # (B, hidden)
        emit = self.policy.needs_decode_mass
        for layer, block in enumerate(self.model.blocks):
            q, k, v = block.qkv(h, positions)  # (B, H_q, D), (B, H_kv, D), (B, H_kv, D)
            # --- eviction stage (decode): a full window frees W slots before the write ---
            self._evict_if_full(state, layer)
            state.arena.append(layer, k, v, positions)
            view = state.arena.layer(layer)
            out, emitted = decode_attention(
                q, view.k, view.v, view.lengths, scale=self.scale, slot_pos=view.pos,
                query_pos=positions, sliding_window=self.cfg.sliding_window, emit=emit,
            )  # fmt: skip
            self.policy.observe_decode(layer, view, emitted)
            h = block.finish(h, out.reshape(h.shape[0], -1))
        state.positions += 1
        return self.model.logits(h)

    def _evict_if_full(self, state: DecodeState, layer: int) -> None:
        """Multi-step eviction (AUV's memory management): when a sequence's heads reach their
        limit, the policy's W lowest-scoring candidate slots are freed and the W window tokens
        are scattered into them, so the arena never grows or fragments."""
        lengths = state.arena.lengths[layer].long()  # (B, H_kv)
        full = (lengths >= state.limits.unsqueeze(1)).any(dim=1)  # (B,)
        if state.window == 0 or not bool(full.any()):
            return
        view = state.arena.layer(layer)
        slots = torch.arange(state.arena.capacity, device=self.device).view(1, 1, -1)
        cache = state.cache_tokens.view(-1, 1, 1)
        candidates = slots < cache  # (B, 1, C): the area outside the decode window
        scores = self.policy.eviction_scores(layer, view)
        victims = select_victims(
            scores, view.pos, candidates.expand_as(scores), state.window, self.policy.options.sinks
        )  # (B, H_kv, W)
        window_slots = (cache + torch.arange(state.window, device=self.device)).expand_as(victims)
        sources = torch.where(full.view(-1, 1, 1), window_slots, victims)  # not full: no-op
        state.arena.scatter(layer, sources, victims)
        new_lengths = torch.where(full.unsqueeze(1), state.cache_tokens.unsqueeze(1), lengths)
        state.arena.set_lengths(layer, new_lengths)

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        stopper: StopChecker,
        on_text: TextCallback | None = None,
    ) -> list[Sequence]:
        """Generates for every prompt until EOS, a stop string, or max_new_tokens."""
        sequences = [Sequence(list(p)) for p in prompts]
        state, logits = self.start(prompts, params.max_new_tokens)
        sampler = Sampler(params, len(prompts), self.device)
        for step in range(params.max_new_tokens):
            tokens = sampler(logits)
            for index, seq in enumerate(sequences):
                if seq.finish_reason is None:
                    delta = stopper.advance(
                        seq, int(tokens[index]), step + 1 == params.max_new_tokens
                    )
                    if delta and on_text is not None:
                        on_text(index, delta)
            if all(seq.finish_reason is not None for seq in sequences):
                break
            logits = self.step(state, tokens)
        return sequences


def _keep_window_queries(
    window_queries: torch.Tensor, q: torch.Tensor, start: int, end: int, n: int
) -> None:
    """Copies the rows of chunk q (start..end) that fall in the last `window` prompt positions."""
    window_start = n - window_queries.shape[0]
    first = max(start, window_start)
    if first < end:
        window_queries[first - window_start : end - window_start] = q[first - start : end - start]
