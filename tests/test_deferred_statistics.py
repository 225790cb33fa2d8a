"""Deferred decode statistics (`Engine.settle`): a policy that only adds up what decode
attention emits (snapkv, h2o, laprox) or keeps the latest step's (tova) gets the statistics of
several steps in one batched pass at its next eviction. The batched emission must equal the
per-step emissions summed (against the dense reference), and a deferred decode must keep the
tokens, scores and value norms of a per-step one."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_hf_model, save_checkpoint

import nanokv
from nanokv.kernels.decode_attention import decode_attention_reference, emitted_over_steps
from nanokv.kernels.value_norms import output_gram, value_output_norms


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emission_over_steps_is_the_sum_of_each_steps_emission(window, dtype):
    """B = 2 sequences, GQA 3, a head-dependent start length; step t appends one slot a head
    and attends with its own query, as decode does."""
    gen = torch.Generator().manual_seed(0)
    batch, kv_heads, group, dim, capacity, steps = 2, 2, 3, 16, 40, 6
    q_heads = kv_heads * group
    k = torch.randn(batch, kv_heads, capacity, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, capacity, dim, generator=gen).to(dtype)
    gram = output_gram(torch.randn(q_heads * dim, q_heads * dim, generator=gen), q_heads, dim)
    norms = value_output_norms(v, gram)  # (B, H_q, C)
    start = torch.tensor([[10, 17], [23, 12]])  # (B, H_kv) lengths before the first step
    base = torch.tensor([30, 40])  # position of each sequence's first step
    query_pos = base.view(-1, 1) + torch.arange(steps)  # (B, n)
    # the slot written at step t (start + t) holds that step's position
    slot_pos = (base.view(-1, 1, 1) - start.unsqueeze(-1) + torch.arange(capacity)).int()
    queries = torch.randn(batch, steps, q_heads, dim, generator=gen).to(dtype)
    masses, contributions = [], []
    for t in range(steps):
        _, emitted = decode_attention_reference(
            queries[:, t], k, v, start + t + 1, scale=0.25, slot_pos=slot_pos,
            query_pos=query_pos[:, t], sliding_window=window, value_norms=norms, emit=True,
        )  # fmt: skip
        masses.append(emitted.mass)
        contributions.append(emitted.contribution)
    lengths = (start.unsqueeze(1) + torch.arange(1, steps + 1).view(1, -1, 1)).to(torch.int32)
    options = dict(
        scale=0.25, slot_pos=slot_pos, query_pos=query_pos, sliding_window=window,
        value_norms=norms,
    )  # fmt: skip
    summed = emitted_over_steps(queries, k, lengths, **options)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(summed.mass, sum(masses), **close)
    torch.testing.assert_close(summed.contribution, sum(contributions), **close)
    assert float(summed.mass[0, 0, 10 + steps :].abs().max()) == 0  # never-valid slots
    stepwise = emitted_over_steps(queries, k, lengths, summed=False, **options)
    torch.testing.assert_close(stepwise.mass, torch.stack(masses, dim=2), **close)
    torch.testing.assert_close(stepwise.contribution, torch.stack(contributions, dim=2), **close)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def model_dir(request, tmp_path_factory):
    """Mistral's sliding window is shorter than the prompt: the batched mask must follow it."""
    model = make_hf_model(request.param)
    return save_checkpoint(model, tmp_path_factory.mktemp(f"deferred-{request.param}"))


def _decode(engine, prompts, steps):
    state, logits = engine.start(prompts, steps + 1)
    tokens = [logits.argmax(-1)]
    for _ in range(steps):
        tokens.append(engine.step(state, tokens[-1]).argmax(-1))
    engine.settle(state)
    return torch.stack(tokens, 1), state


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "laprox", "tova", "auv"])
def test_deferred_decode_keeps_what_per_step_statistics_keep(model_dir, policy, monkeypatch):
    """Two prompts of different lengths, 45 steps: several evictions (each settles first) and
    a settle at DEFERRED_STEPS; the same tokens, kept positions, scores and value norms as
    with the statistics observed at every step."""
    llm = nanokv.LLM(model_dir, dtype="float32")
    llm.configure(policy, budget=0.3, min_cache=0)
    prompts = [list(range(5, 75)), list(range(40, 95))]
    tokens, deferred = _decode(llm.engine, prompts, 45)
    assert deferred.pending and not any(deferred.pending)  # it deferred, and settled all
    monkeypatch.setattr(type(llm.engine.policy), "decode_statistics", "every step")
    expected_tokens, stepped = _decode(llm.engine, prompts, 45)
    assert torch.equal(tokens, expected_tokens)
    a, b = deferred.arena, stepped.arena
    assert torch.equal(a.lengths, b.lengths)
    for layer in range(len(a.k)):
        assert torch.equal(a.pos[layer], b.pos[layer])
        torch.testing.assert_close(a.score[layer], b.score[layer], atol=1e-5, rtol=1e-5)
        if a.value_norms is not None:
            torch.testing.assert_close(a.value_norms[layer], b.value_norms[layer])


DEFERS = [("laprox", True), ("snapkv", True), ("streaming", False), ("laprox+quest", False)]


@pytest.mark.parametrize(("policy", "defers"), DEFERS)
def test_deferred_bytes_bound_the_queries_a_decode_keeps(tiny_llama_dir, policy, defers):
    """`Engine.deferred_bytes` (what the server's pool counts besides the arena) is the most a
    decode's pending queries ever hold, reached when DEFERRED_STEPS steps wait (a window W of
    at least that many); 0 for a policy that emits nothing or emits every step (Quest)."""
    from nanokv.engine import DEFERRED_STEPS

    llm = nanokv.LLM(tiny_llama_dir, policy=policy, budget=0.3, min_cache=0, dtype="float32")
    engine, cfg = llm.engine, llm.config
    bound = engine.deferred_bytes()
    want = DEFERRED_STEPS * cfg.num_layers * cfg.num_heads * cfg.head_dim * 4 if defers else 0
    assert bound == want
    state, logits = engine.start([list(range(5, 125))], 80, decode_window=40)  # W > 32
    most = 0
    for _ in range(70):
        logits = engine.step(state, logits.argmax(-1))
        most = max(most, sum(q.nbytes for layer in state.pending for q in layer))
    assert most == bound
