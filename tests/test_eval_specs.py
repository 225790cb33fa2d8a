"""Policy specs, the needle oracle, and the eval's engine path against the public LLM calls."""

from __future__ import annotations

import pytest
import torch
from test_eval_fixtures import long_tiny_llm_fixture  # noqa: F401

from nanokv.eval.ask import answer, build_prompt
from nanokv.eval.niah import NiahSpec, make_case
from nanokv.eval.specs import engine_for, parse_spec
from nanokv.eval.suites import _positions
from nanokv.sampling import SamplingParams


def test_specs_parse_options_quest_settings_and_the_oracle():
    spec = parse_spec("laprox:pool=31, allocation=global,normalise=sum")
    assert (
        spec.policy == "laprox" and spec.label == "laprox:pool=31,allocation=global,normalise=sum"
    )
    assert spec.options == {"pool": 31, "allocation": "global", "normalise": "sum"}
    assert parse_spec("snapkv:window=16").options == {"observation_window": 16}
    assert parse_spec("quest:oracle").quest == {"quest_oracle": True}
    assert parse_spec("snapkv+quest:quest_budget=0.02").quest == {"quest_budget": 0.02}
    oracle = parse_spec("needle-oracle:base=laprox,pool=15")
    assert oracle.needle_oracle and oracle.policy == "laprox" and oracle.options == {"pool": 15}
    assert parse_spec("needle-oracle").policy == "snapkv"
    assert parse_spec("full").is_full and not parse_spec("quest").is_full


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus", "unknown policy"),
        ("snapkv:pool=4", "pool must be an odd"),
        ("snapkv:colour=1", "unknown key 'colour'"),
        ("snapkv:oracle", "Quest keys need"),
        ("needle-oracle:base=full", "evicting base"),
        ("snapkv:pool=", "has no value"),
    ],
)
def test_bad_specs_raise_one_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(text)


@pytest.fixture(scope="module")
def case(long_tiny_llm):
    return make_case(NiahSpec("single", "neutral", 900, 0.5, 0), long_tiny_llm.tokenizer)


@pytest.mark.parametrize("setting", ["question", "context"])
def test_needle_oracle_keeps_the_value_that_its_base_drops(long_tiny_llm, case, setting):
    tokenizer = long_tiny_llm.tokenizer
    prompt = build_prompt(tokenizer, setting, case.document, case.question, case.answer_prefix)
    values = _positions(tokenizer, prompt, case.expected)
    assert tokenizer.decode(prompt.prefill[values[0] : values[-1] + 1]).strip() == case.expected[0]
    params = SamplingParams(max_new_tokens=4)
    shares = {}
    for text in ("streaming", "needle-oracle:base=streaming"):
        engine, oracle = engine_for(long_tiny_llm, parse_spec(text), 0.1)
        if oracle is not None:
            oracle.forced = torch.tensor(values)
        outcome = answer(long_tiny_llm, engine, prompt, params, values)
        shares[text] = outcome.tracked_kept
    assert shares["streaming"] == [0.0] * long_tiny_llm.config.num_layers
    assert shares["needle-oracle:base=streaming"] == [1.0] * long_tiny_llm.config.num_layers


@pytest.mark.parametrize("policy", ["snapkv", "laprox", "quest"])
def test_eval_answers_equal_the_public_llm_calls(long_tiny_llm, case, policy):
    """The eval's engine path and the public `chat` / `compress` calls give the same answer, in
    both settings. EOS is ignored and no stop string is set, so each answer is the full
    `max_new_tokens` of real text: two empty strings cannot pass."""
    llm, tokenizer = long_tiny_llm, long_tiny_llm.tokenizer
    new = 6
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    engine, _ = engine_for(llm, parse_spec(policy), 0.2)
    question = build_prompt(tokenizer, "question", case.document, case.question, case.answer_prefix)
    mine = answer(llm, engine, question, params).text
    chat = llm.chat([case.document + case.question], params, answer_prefix=case.answer_prefix)
    assert chat[0].prompt_token_ids == question.prefill  # the same prompt went in
    assert len(chat[0].token_ids) == new and chat[0].text.strip()
    assert mine == chat[0].text
    if policy != "quest":  # the prompt really was compressed (quest holds the full cache)
        kept = float(llm.last_report.kept_after_prefill.float().mean())
        assert kept <= 0.2 * len(question.prefill) + 1
    context = build_prompt(tokenizer, "context", case.document, case.question, case.answer_prefix)
    engine, _ = engine_for(llm, parse_spec(policy), 0.2, setting="context")  # compress's policy
    mine = answer(llm, engine, context, params).text
    compressed = llm.compress(
        case.document, max_question_tokens=len(context.follow), max_new_tokens=new
    )
    asked = llm.chat([case.question], params, context=compressed, answer_prefix=case.answer_prefix)
    assert asked[0].prompt_token_ids == context.follow
    assert len(asked[0].token_ids) == new and asked[0].text.strip()
    assert mine == asked[0].text
