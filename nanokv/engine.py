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
from nanokv.config import ModelConfig
from nanokv.kernels.decode_attention import decode_attention
from nanokv.policies import Policy, PromptLayer
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


class Engine:
    """Runs a loaded model with an eviction policy over a preallocated arena."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: ModelConfig,
        policy: Policy,
        *,
        prefill_chunk: int = 512,
    ) -> None:
        self.model, self.cfg, self.policy = model, cfg, policy
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
        capacity = self.policy.arena_capacity(max(map(len, prompts)), max_new_tokens)
        arena = KVArena(
            cfg.num_layers, len(prompts), cfg.num_kv_heads, capacity, cfg.head_dim,
            dtype=self.dtype, device=self.device,
        )  # fmt: skip
        logits = torch.cat([self.prefill(arena, seq, ids) for seq, ids in enumerate(prompts)])
        positions = torch.tensor([len(p) for p in prompts], device=self.device)
        return DecodeState(arena, positions), logits

    @torch.inference_mode()
    def prefill(
        self, arena: KVArena, seq: int, prompt: list[int], all_logits: bool = False
    ) -> torch.Tensor:
        """Runs one prompt layer by layer, leaving the kept K/V in the arena's row `seq`.
        Returns (1, vocab) logits of the last token, or (n, vocab) with `all_logits`."""
        ids = torch.tensor(prompt, device=self.device)
        positions = torch.arange(len(prompt), device=self.device)
        h = self.model.embed(ids, positions)  # (n, hidden)
        for layer, block in enumerate(self.model.blocks):
            prompt_layer = self._prefill_layer(layer, block, h, positions)
            # --- eviction stage (prefill): the policy picks the kept tokens of this layer ---
            kept = self.policy.prefill_keep(prompt_layer)
            arena.fill(layer, seq, prompt_layer.k, prompt_layer.v, positions, kept)
        return self.model.logits(h if all_logits else h[-1:])

    def _prefill_layer(
        self, layer: int, block: torch.nn.Module, h: torch.Tensor, positions: torch.Tensor
    ) -> PromptLayer:
        """Runs `block` over the prompt in query chunks, updating h (n, hidden) in place."""
        n, cfg = h.shape[0], self.cfg
        k_all = h.new_empty(n, cfg.num_kv_heads, cfg.head_dim)
        v_all = torch.empty_like(k_all)
        window = min(self.policy.observation_window, n)
        window_queries = h.new_empty(window, cfg.num_heads, cfg.head_dim)
        for start in range(0, n, self.prefill_chunk):
            end = min(start + self.prefill_chunk, n)
            q, k_all[start:end], v_all[start:end] = block.qkv(h[start:end], positions[start:end])
            attn = prefill_attention(
                q, k_all[:end], v_all[:end], positions[start:end], positions[:end],
                scale=self.scale, sliding_window=cfg.sliding_window,
            )  # fmt: skip
            h[start:end] = block.finish(h[start:end], attn)
            _keep_window_queries(window_queries, q, start, end, n)
        return PromptLayer(
            layer=layer,
            k=k_all.transpose(0, 1),
            v=v_all.transpose(0, 1),
            positions=positions,
            window_queries=window_queries.transpose(0, 1),
        )

    @torch.inference_mode()
    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds one token per sequence (B,) and returns the next-token logits (B, vocab)."""
        positions = state.positions
        h = self.model.embed(tokens, positions)  # (B, hidden)
        for layer, block in enumerate(self.model.blocks):
            q, k, v = block.qkv(h, positions)  # (B, H_q, D), (B, H_kv, D), (B, H_kv, D)
            state.arena.append(layer, k, v, positions)
            view = state.arena.layer(layer)
            out, _ = decode_attention(
                q, view.k, view.v, view.lengths, scale=self.scale, slot_pos=view.pos,
                query_pos=positions, sliding_window=self.cfg.sliding_window,
            )  # fmt: skip
            # --- eviction stage (decode): policies that score decode steps hook in here ---
            h = block.finish(h, out.reshape(h.shape[0], -1))
        state.positions += 1
        return self.model.logits(h)

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
