"""Fidelity: full vs full is exact; a budget that keeps everything is exact for every policy; a
small budget is measurably different."""

from __future__ import annotations

import pytest
from test_eval_fixtures import long_tiny_llm_fixture  # noqa: F401

from nanokv.eval.fidelity import FidelitySpec, compare, make_fidelity_case, teacher_force
from nanokv.eval.specs import engine_for, parse_spec
from nanokv.policies import POLICIES

EVERY_POLICY = [*POLICIES, "quest", "snapkv+quest", "laprox+quest"]
KEEP_ALL = 4096  # a token budget above prompt + continuation: nothing is evicted or skipped


@pytest.fixture(scope="module")
def case(long_tiny_llm):
    return make_fidelity_case(FidelitySpec("docs", 300, 8, 0), long_tiny_llm.tokenizer)


@pytest.fixture(scope="module")
def reference(long_tiny_llm, case):
    engine, _ = engine_for(long_tiny_llm, parse_spec("full"), 1.0)
    return teacher_force(engine, case)


def test_case_has_the_requested_lengths(long_tiny_llm, case):
    assert len(case.context) == 300 and len(case.continuation) == 8
    assert FidelitySpec.from_id(case.spec.id) == case.spec
    code = make_fidelity_case(FidelitySpec("code", 300, 8, 1), long_tiny_llm.tokenizer)
    assert code.text_name.startswith("stdlib/") and code.text_name.endswith(".py")
    assert len(code.context) == 300 and len(code.continuation) == 8


def test_full_vs_full_is_exact(long_tiny_llm, case, reference):
    engine, _ = engine_for(long_tiny_llm, parse_spec("full"), 1.0)
    result = compare(reference, teacher_force(engine, case), case.continuation)
    assert result["agreement"] == 1.0
    assert result["kl"] == 0.0
    assert all(c == pytest.approx(1.0, abs=1e-6) for c in result["cosine"])
    assert len(result["cosine"]) == long_tiny_llm.config.num_layers


@pytest.mark.parametrize("policy", EVERY_POLICY)
def test_a_budget_that_keeps_everything_is_exact(long_tiny_llm, case, reference, policy):
    engine, _ = engine_for(long_tiny_llm, parse_spec(policy), KEEP_ALL)
    result = compare(reference, teacher_force(engine, case), case.continuation)
    assert result["agreement"] == 1.0
    assert result["kl"] < 1e-6
    assert min(result["cosine"]) > 1 - 1e-5


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "laprox"])
def test_a_small_budget_is_measurably_different(long_tiny_llm, case, reference, policy):
    engine, _ = engine_for(long_tiny_llm, parse_spec(policy), 0.1)
    result = compare(reference, teacher_force(engine, case), case.continuation)
    assert result["kl"] > 1e-3
    assert min(result["cosine"]) < 0.999
