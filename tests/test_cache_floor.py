"""The cache floor: a budget never cuts a head below `floor` tokens (nor below the sinks and
observation window the selection protects); a prompt and answer that fit under it are never
evicted; decode-time eviction after a short prompt keeps the floor plus the decode window."""

from __future__ import annotations

import pytest
import torch

from nanokv.budget import Budget
from nanokv.engine import Engine
from nanokv.loader import load_config, load_model
from nanokv.policies import make_policy
from nanokv.policies.allocation import ALLOCATIONS

LONG = [(17 * i + 5) % 300 + 3 for i in range(200)]
SHORT = LONG[:20]


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    cfg = load_config(tiny_llama_dir)
    return load_model(tiny_llama_dir, cfg, torch.float32, torch.device("cpu")), cfg


def _engine(model, policy: str, budget: Budget, **options) -> Engine:
    net, cfg = model
    options = {"observation_window": 8, "decode_window": 4, **options}
    return Engine(net, cfg, make_policy(policy, **options), budget=budget, prefill_chunk=64)


def _greedy(engine: Engine, prompt: list[int], steps: int):
    """Greedy logits of every step and each head's length after every step."""
    state, logits = engine.start([prompt], steps)
    out, lengths = [logits], []
    for _ in range(steps - 1):
        logits = engine.step(state, logits.argmax(-1))
        out.append(logits)
        lengths.append(state.arena.lengths.clone())
    return out, lengths, state


def test_budget_floor_is_validated_and_raises_the_cache():
    with pytest.raises(ValueError, match="min_cache"):
        Budget(0.05, floor=-1)
    assert Budget(0.05, floor=128).cache_tokens(1000, 10) == 128
    assert Budget(0.05, floor=128).cache_tokens(4000, 10) == 200
    assert Budget(0.05, floor=128).is_floored(1000) and not Budget(0.05).is_floored(1000)


@pytest.mark.parametrize("policy", ["snapkv", "laprox", "h2o", "auv"])
def test_a_prompt_and_answer_under_the_floor_is_the_full_cache(model, policy):
    full, _, _ = _greedy(_engine(model, "full", Budget(1.0)), SHORT, 10)
    floored, _, state = _greedy(_engine(model, policy, Budget(0.05, floor=30)), SHORT, 10)
    for a, b in zip(full, floored, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert state.window == 0  # nothing will ever be evicted


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "laprox", "tova"])
def test_decode_after_a_short_prompt_keeps_the_floor_plus_the_window(model, policy):
    engine = _engine(model, policy, Budget(0.05, floor=24))
    _, lengths, state = _greedy(engine, SHORT, 40)  # 20 + 40 tokens: evictions from step 8
    assert state.arena.capacity == 24 + state.window
    assert int(state.cache_tokens.min()) == 24
    written = [len(SHORT) + step + 1 for step in range(len(lengths))]
    for step_lengths, total in zip(lengths, written, strict=True):
        assert int(step_lengths.min()) >= min(24, total)
    assert int(lengths[-1].max()) <= 24 + state.window


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_no_head_is_cut_below_the_floor(model, allocation):
    options = {"allocation": allocation, "reconstruct": False}
    exact = _engine(model, "laprox", Budget(0.05), **options)
    floored = _engine(model, "laprox", Budget(0.05, floor=48), **options)
    exact_state, _ = exact.start([LONG], 4)
    state, _ = floored.start([LONG], 4)
    assert int(exact_state.arena.lengths.min()) < 48  # without the floor some head keeps less
    assert int(state.arena.lengths.min()) >= 48
    assert floored.eviction.is_floored(len(LONG)) and not exact.eviction.is_floored(len(LONG))


def test_the_floor_covers_the_protected_sinks_and_window(model):
    engine = _engine(model, "snapkv", Budget(0.05, floor=1), sinks=4, observation_window=32)
    state, _ = engine.start([LONG], 4)
    assert int(state.arena.lengths.min()) == 36  # 4 sinks + 32 window, not 1 nor 10
    assert "cache floor 36" in engine.eviction.describe(len(LONG), 4)


def test_describe_says_what_set_the_cache(model):
    engine = _engine(model, "snapkv", Budget(0.05, floor=30))
    assert "nothing evicted" in engine.eviction.describe(len(SHORT), 8)
    assert "the floor sets the cache (30 tokens a head)" in engine.eviction.describe(len(LONG), 8)
    exact = _engine(model, "snapkv", Budget(0.5))
    assert "no cache floor" in exact.eviction.describe(len(LONG), 8)
