"""NIAH generators and scorer: requested length, needle depth, unique keys and values, ids."""

from __future__ import annotations

import re

import pytest
from test_eval_fixtures import tiny_tokenizer_fixture  # noqa: F401

from nanokv.eval.ask import build_prompt
from nanokv.eval.niah import HEADER, NiahSpec, make_case, score
from nanokv.eval.tokens import counter, token_span

NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\d+)\.")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _prompt(tokenizer, case, setting="question"):
    return build_prompt(tokenizer, setting, case.document, case.question, case.answer_prefix)


def _measured_depth(tokenizer, case) -> tuple[float, float]:
    """(depth of the asked needle in filler tokens, tolerance): filler tokens before the needle
    over all filler tokens; the tolerance is half the longest filler sentence (needles go
    between sentences) plus a few tokens."""
    ids = _prompt(tokenizer, case).prefill
    _, start = token_span(tokenizer, ids, HEADER.strip())
    end, _ = token_span(tokenizer, ids, case.question.strip())
    needle, _ = token_span(tokenizer, ids, case.asked[0])
    count = counter(tokenizer)
    sentences = [_needle_text(k, v) for k, v in NEEDLE.findall(case.document)]
    asked_at = case.document.index(case.asked[0])
    other_before = sum(count(" " + s) for s in sentences if case.document.index(s) < asked_at)
    filler_tokens = end - start - sum(count(" " + s) for s in sentences)
    depth = (needle - start - other_before) / filler_tokens
    haystack = case.document[len(HEADER) :]
    filler = [s for s in SENTENCE_END.split(haystack) if not NEEDLE.fullmatch(s)]
    longest = max(count(" " + s) for s in filler)
    return depth, (longest / 2 + 3) / filler_tokens


def _needle_text(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


@pytest.mark.parametrize("task", ["single", "multikey", "multivalue"])
@pytest.mark.parametrize("filler", ["neutral", "prose"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_prompt_length_and_needle_depth(tiny_tokenizer, task, filler, depth):
    length = 3000
    case = make_case(NiahSpec(task, filler, length, depth, seed=1), tiny_tokenizer)
    assert abs(_prompt(tiny_tokenizer, case).tokens - length) <= 2
    measured, tolerance = _measured_depth(tiny_tokenizer, case)
    assert abs(measured - depth) <= tolerance, (measured, depth, tolerance)


@pytest.fixture(scope="module")
def default_tokenizer(default_model_dir):
    from nanokv.tokenizer import Tokenizer

    return Tokenizer(default_model_dir)


@pytest.mark.default_model
@pytest.mark.parametrize("length", [1024, 4096])
def test_default_tokenizer_length_and_depth(default_tokenizer, length):
    for task in ("single", "multikey", "multivalue"):
        for depth in (0.1, 0.5, 0.9):
            case = make_case(NiahSpec(task, "prose", length, depth, 0), default_tokenizer)
            assert abs(_prompt(default_tokenizer, case).tokens - length) <= 2
            measured, tolerance = _measured_depth(default_tokenizer, case)
            assert abs(measured - depth) <= tolerance, (task, depth, measured)


@pytest.mark.parametrize(
    "task, needles, keys", [("single", 1, 1), ("multikey", 4, 4), ("multivalue", 4, 1)]
)
def test_keys_and_values_are_unique(tiny_tokenizer, task, needles, keys):
    for seed in range(5):
        case = make_case(NiahSpec(task, "neutral", 1200, 0.5, seed), tiny_tokenizer)
        found = NEEDLE.findall(case.document)
        assert len(found) == needles
        assert len({k for k, _ in found}) == keys
        assert len({v for _, v in found}) == needles
        assert all(len(v) == 7 for _, v in found)
        asked_key = found[[v for _, v in found].index(case.expected[0])][0]
        assert asked_key in case.question and asked_key in case.answer_prefix
        assert len(case.expected) == (needles if task == "multivalue" else 1)
        for value in case.expected:
            assert case.document.count(value) == 1


def test_context_setting_prefills_the_document_and_asks_after(tiny_tokenizer):
    case = make_case(NiahSpec("single", "neutral", 1000, 0.5, 0), tiny_tokenizer)
    question = _prompt(tiny_tokenizer, case)
    context = _prompt(tiny_tokenizer, case, "context")
    assert context.follow and not question.follow
    assert abs(context.tokens - question.tokens) <= 2
    assert case.expected[0] in tiny_tokenizer.decode(context.prefill)
    assert case.expected[0] not in tiny_tokenizer.decode(context.follow)


def test_case_is_reproducible_from_its_id(tiny_tokenizer):
    spec = NiahSpec("multikey", "prose", 1500, 0.25, 3)
    assert spec.id == "niah/multikey/prose/L1500/d0.25/s3"
    again = NiahSpec.from_id(spec.id)
    assert again == spec
    assert make_case(again, tiny_tokenizer) == make_case(spec, tiny_tokenizer)
    other = make_case(NiahSpec("multikey", "prose", 1500, 0.25, 4), tiny_tokenizer)
    assert other.document != make_case(spec, tiny_tokenizer).document
    assert make_case(spec, tiny_tokenizer).sources  # where the prose came from


def test_bad_specs_raise():
    with pytest.raises(ValueError, match="unknown task"):
        NiahSpec("triple", "prose", 1000, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        NiahSpec("single", "prose", 1000, 1.5, 0)
    with pytest.raises(ValueError, match="not a niah case id"):
        NiahSpec.from_id("niah/single/prose/1000")


def test_scorer_accepts_right_and_rejects_wrong_answers():
    assert score(" 1234567.", ("1234567",)) == 1.0
    assert score("The number is 1234567, I think", ("1234567",)) == 1.0
    assert score(" 1234568.", ("1234567",)) == 0.0
    assert score(" 12345678.", ("1234567",)) == 0.0  # a longer run is not the value
    assert score(" 123456.", ("1234567",)) == 0.0
    assert score("", ("1234567",)) == 0.0
    assert score("1111111 and 2222222", ("1111111", "2222222", "3333333", "4444444")) == 0.5
    assert (
        score("4444444, 3333333, 2222222, 1111111", ("1111111", "2222222", "3333333", "4444444"))
        == 1.0
    )


def test_the_prose_corpus_leaves_out_nanokvs_own_readme():
    """Haystacks come from texts installed packages ship, but never from nanokv's own package
    description (this README, which changes with every results table): the cases of a corpus
    must not move when the README does."""
    from nanokv.eval.corpus import _prose_sources

    names = [name for name, _ in _prose_sources()]
    assert names and not any("nanokv" in name.lower() for name in names)
    assert any(name.startswith("site-packages/") for name in names)
