"""Quest in the decode loop: dense equivalence at full read budget, real sparsity below it, the
page oracle, and composition with an eviction policy."""

from __future__ import annotations

import pytest
import torch

import nanokv

PROMPTS = ["the quick brown fox jumps over the lazy dog " * 8, "hello world, a kv cache test " * 5]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return nanokv.LLM(tiny_llama_dir, prefill_chunk=32, min_cache=0, dtype="float32")


def _logits(llm, steps=10):
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    state, logits = llm.engine.start(ids, steps)
    out = [logits]
    for _ in range(steps - 1):
        logits = llm.engine.step(state, logits.argmax(-1))
        out.append(logits)
    return torch.stack(out), state


def test_a_read_budget_covering_every_page_is_dense(llm):
    llm.configure("full")
    dense, _ = _logits(llm)
    llm.configure("quest", budget=1.0, quest_budget=4096, quest_dense_layers=1)
    sparse, state = _logits(llm)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    assert 0 < state.quest.pages_read == state.quest.pages_held


@pytest.mark.parametrize("oracle", [False, True])
def test_a_small_read_budget_reads_fewer_pages(llm, oracle):
    llm.configure("quest", budget=32.0, quest_oracle=oracle, quest_dense_layers=1)
    logits, state = _logits(llm)
    assert torch.isfinite(logits).all()
    assert 0 < state.quest.pages_read < state.quest.pages_held
    assert state.quest.token_budget == 32
    assert state.arena.lengths[:, 0, 0].eq(state.arena.lengths[0, 0, 0]).all()  # no eviction


def test_quest_composes_with_eviction(llm):
    llm.configure(
        "snapkv+quest", budget=40.0, quest_budget=16.0, quest_dense_layers=1, decode_window=4
    )
    outputs = llm.generate(PROMPTS, max_new_tokens=8)
    report = llm.last_report
    assert report.policy == "snapkv+quest"
    assert 0 < report.quest_read_fraction < 1
    assert int(report.kept_after_prefill.max()) == 40
    assert all(len(o.token_ids) == 8 for o in outputs)


def test_bad_policy_specs():
    from nanokv.policies import parse_policy

    assert parse_policy("laprox+quest") == ("laprox", True)
    assert parse_policy("quest") == ("full", True)
    for bad in ["h2o+snapkv", "nope", "quest+quest"]:
        with pytest.raises(ValueError):
            parse_policy(bad)


def test_the_c_step_equals_the_torch_step(llm, monkeypatch):
    """On a CPU a Quest step runs in the C kernel (`cpu_quest_attention`, and the bounds'
    update `cpu_merge_page_bounds`) where it applies: the same logits (fp32, within rounding)
    and pages read as the torch ops' step."""
    from nanokv.kernels import native

    if native.library("cpu_attention") is None:
        pytest.skip("no C kernel here")
    llm.configure("quest", budget=32.0, quest_dense_layers=1)
    real, calls = nanokv.sparsity.cpu_quest_attention, []
    monkeypatch.setattr(
        nanokv.sparsity, "cpu_quest_attention", lambda *args: calls.append(1) or real(*args)
    )
    in_c, state_c = _logits(llm)
    assert calls  # the C step ran
    monkeypatch.setattr(nanokv.sparsity, "cpu_quest_attention", lambda *args: None)
    monkeypatch.setattr(nanokv.sparsity, "cpu_merge_page_bounds", lambda *args: False)
    in_torch, state_torch = _logits(llm)
    torch.testing.assert_close(in_c, in_torch, atol=1e-5, rtol=1e-5)
    assert state_c.quest.pages_read == state_torch.quest.pages_read
    assert state_c.quest.pages_held == state_torch.quest.pages_held
