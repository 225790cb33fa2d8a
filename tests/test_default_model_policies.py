"""Every policy on the default model: a ~1k-token prompt at budget 0.25 generates, and laprox at
budget 1.0 is the full cache."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.default_model

POLICIES = ["streaming", "h2o", "snapkv", "tova", "auv", "laprox", "quest", "laprox+quest"]


@pytest.fixture(scope="module")
def llm(default_model_dir):
    import nanokv

    return nanokv.LLM(default_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def prompt(llm) -> list[int]:
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    question = "\n\nIn one sentence, what does the module above do?"
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": text[:4000] + question}])
    assert 900 <= len(ids) <= 1400
    return ids


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_generates_at_a_quarter_budget(llm, prompt, policy):
    llm.configure(policy, budget=0.25)
    state, logits = llm.engine.start([prompt], 8)
    for _ in range(7):
        logits = llm.engine.step(state, logits.argmax(-1))
    assert torch.isfinite(logits).all()
    kept = state.kept_after_prefill.float().mean()
    if policy != "quest":
        assert abs(kept - 0.25 * len(prompt)) <= 1  # the mean kept per head is the budget


def test_laprox_at_full_budget_is_the_full_cache(llm, prompt):
    llm.configure("full")
    full = llm.generate(llm.tokenizer.decode(prompt), max_new_tokens=12)[0]
    llm.configure("laprox", budget=1.0)
    ours = llm.generate(llm.tokenizer.decode(prompt), max_new_tokens=12)[0]
    assert ours.token_ids == full.token_ids
