"""Property tests of the arena under the real decode loop: random prompt lengths, budgets,
windows, allocations and step counts, for every eviction policy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from nanokv.budget import Budget
from nanokv.engine import Engine
from nanokv.loader import load_config, load_model
from nanokv.policies import POLICIES, make_policy
from nanokv.policies.allocation import MODEL_WIDE
from nanokv.reconstruct import RECONSTRUCTED_POS

SINKS = 2


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    cfg = load_config(tiny_llama_dir)
    return cfg, load_model(tiny_llama_dir, cfg, torch.float32, torch.device("cpu"))


def _held(state, layer, seq, head) -> list[int]:
    length = int(state.arena.lengths[layer, seq, head])
    return state.arena.pos[layer, seq, head, :length].tolist()


@given(
    policy=st.sampled_from([p for p in POLICIES if p != "full"]),
    allocation=st.sampled_from(["uniform", "pyramid", "layer", "global", "layerwise"]),
    lengths=st.lists(st.integers(3, 50), min_size=1, max_size=2),
    budget=st.integers(4, 30),
    window=st.integers(0, 5),
    steps=st.integers(1, 12),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# AUV with a `layer` allocation: a head keeps its whole prompt plus the reconstructed slot, one
# more than the plan's head cap; the arena once had no room left for the decode window
@example(policy="auv", allocation="layer", lengths=[14], budget=13, window=0, steps=2)
def test_arena_invariants_through_decode(tiny, policy, allocation, lengths, budget, window, steps):
    cfg, model = tiny
    assume(not (policy == "auv" and allocation in MODEL_WIDE))  # its slot needs a layer's plan
    chosen = make_policy(
        policy, allocation=allocation, sinks=SINKS, observation_window=3, decode_window=window,
        pool=3,
    )  # fmt: skip
    engine = Engine(model, cfg, chosen, budget=Budget(float(budget)), prefill_chunk=8)
    prompts = [[(7 * i + 11 * s) % 300 + 3 for i in range(n)] for s, n in enumerate(lengths)]
    state, logits = engine.start(prompts, steps)
    capacity = state.arena.capacity
    layers, heads = cfg.num_layers, cfg.num_kv_heads
    for seq, n in enumerate(lengths):
        kept = state.arena.lengths[:, seq]
        if n > budget and allocation != "pyramid":
            assert int(kept.sum()) == budget * layers * heads  # the budget is exact
    previous = {}
    for step in range(steps):
        for layer in range(layers):
            for seq, n in enumerate(lengths):
                for head in range(heads):
                    held = _held(state, layer, seq, head)
                    real = [p for p in held if p >= 0]
                    assert len(held) <= capacity
                    assert len(set(real)) == len(real)  # no duplicate token
                    reconstructed = held.count(RECONSTRUCTED_POS)
                    assert reconstructed == int(policy == "auv" and n > budget) or (
                        allocation != "uniform" and reconstructed <= 1
                    )
                    assert len(real) + held.count(RECONSTRUCTED_POS) == len(held)
                    newest = n + step - 1
                    assert newest in real  # the token just written is always there
                    assert set(range(min(SINKS, n))) <= set(real)  # sinks survive
                    key = (layer, seq, head)
                    if key in previous:  # nothing appears from nowhere
                        assert set(real) <= previous[key] | {newest}
                    previous[key] = set(real)
        if step + 1 < steps:
            logits = engine.step(state, logits.argmax(-1))
    assert torch.isfinite(logits).all()
