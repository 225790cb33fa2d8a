"""The runner: one decode step for a batch whose members each have their own arena and policy.

The weight matrices are read once for the whole batch (one GEMM per projection over all the
members' rows); attention, the eviction stage and the policy's observation run per member,
against its own arena, through its own engine (`Engine.attend_layer`). Members may differ in
policy, budget and cache size: the server's requests do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.engine import DecodeState, Engine


@dataclass(frozen=True)
class Member:
    """One sequence of a decode batch: the engine that joins its policy to the model, and its
    state (a one-sequence arena)."""

    engine: Engine
    state: DecodeState


@torch.inference_mode()
def decode_step(
    model: torch.nn.Module, members: list[Member], tokens: torch.Tensor
) -> torch.Tensor:
    """Feeds one token per member, tokens (B,), and returns the next-token logits (B, vocab).
    With one member this is exactly `Engine.step`."""
    positions = torch.cat([member.state.positions for member in members])  # (B,)
    h = model.embed(tokens, positions)  # (B, hidden)
    for layer, block in enumerate(model.blocks):
        q, k, v = block.qkv(h, positions)  # (B, H_q, D), (B, H_kv, D), (B, H_kv, D)
        outs = []
        # each member's rows, (1, H, D) views: one split a tensor, not three slices a member
        for member, *rows in zip(members, q.split(1), k.split(1), v.split(1), strict=True):
            member.engine.policy.bind(member.state.memory)
            outs.append(member.engine.attend_layer(member.state, layer, *rows))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # (B, H_q, D)
        h = block.finish(h, out.reshape(h.shape[0], -1))
    for member in members:
        member.state.positions += 1
    return model.logits(h)
