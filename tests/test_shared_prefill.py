"""One recorded prompt pass serves every policy: kept slots and greedy tokens equal a separate
prefill's (what lets an evaluation grid prefill each case once)."""

from __future__ import annotations

import pytest
import torch

from nanokv.budget import Budget
from nanokv.engine import Engine
from nanokv.loader import load_config, load_model
from nanokv.policies import POLICIES, make_policy
from nanokv.policies.allocation import ALLOCATIONS, MODEL_WIDE
from nanokv.sparsity import QuestOptions

PROMPT = [(13 * i + 7) % 300 + 3 for i in range(90)]
STEPS = 16


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    cfg = load_config(tiny_llama_dir)
    return load_model(tiny_llama_dir, cfg, torch.float32, torch.device("cpu")), cfg


def _engine(model, name: str, allocation: str, quest: bool = False) -> Engine:
    net, cfg = model
    options = dict(allocation=allocation, decode_window=4, observation_window=8, pool=3)
    if name == "auv" and allocation in MODEL_WIDE:
        options["reconstruct"] = False
    budget = Budget(1.0) if name == "full" else Budget(0.25)
    quest_options = QuestOptions(budget=Budget(0.5)) if quest else None
    policy = make_policy(name, **options)
    return Engine(net, cfg, policy, budget=budget, quest=quest_options, prefill_chunk=32)


def _greedy(engine: Engine, records=None):
    state, logits = engine.start([PROMPT], STEPS, records=records)
    kept = (state.arena.pos.clone(), state.arena.lengths.clone())
    tokens = []
    for _ in range(STEPS):
        token = logits.argmax(-1)
        tokens.append(int(token))
        logits = engine.step(state, token)
    return kept, tokens, state


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("name", list(POLICIES))
def test_recorded_pass_keeps_the_same_tokens_and_decodes_the_same(model, name, allocation):
    engine = _engine(model, name, allocation)
    record = _engine(model, "full", "uniform").record_prompt(PROMPT)  # another policy records
    (pos, lengths), tokens, live = _greedy(engine)
    (pos_r, lengths_r), tokens_r, shared = _greedy(engine, [record])
    assert torch.equal(lengths, lengths_r)
    for layer in range(lengths.shape[0]):
        for head in range(lengths.shape[2]):
            held = int(lengths[layer, 0, head])
            assert torch.equal(pos[layer, 0, head, :held], pos_r[layer, 0, head, :held])
    assert tokens == tokens_r
    torch.testing.assert_close(live.arena.k, shared.arena.k, atol=0, rtol=0)
    torch.testing.assert_close(live.arena.score, shared.arena.score, atol=0, rtol=0)


def test_recorded_pass_composes_with_quest(model):
    engine = _engine(model, "snapkv", "uniform", quest=True)
    record = engine.record_prompt(PROMPT)
    assert _greedy(engine)[1] == _greedy(engine, [record])[1]


def test_a_record_of_another_prompt_is_refused(model):
    engine = _engine(model, "snapkv", "uniform")
    record = engine.record_prompt(PROMPT[:-1])
    with pytest.raises(ValueError, match="recorded passes of these prompts"):
        engine.start([PROMPT], STEPS, records=[record])
