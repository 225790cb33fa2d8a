"""Code completion: the prompt is whole lines before the cut, the target the next line; edit
similarity and the first-line stop."""

from __future__ import annotations

import pytest
from test_eval_fixtures import tiny_tokenizer_fixture  # noqa: F401

from nanokv.engine import Sequence
from nanokv.eval.code import CodeSpec, FirstLine, edit_similarity, first_line, make_code_case
from nanokv.eval.corpus import code_files


@pytest.mark.parametrize("seed", range(4))
def test_prompt_is_the_lines_before_the_target(tiny_tokenizer, seed):
    case = make_code_case(CodeSpec(800, seed), tiny_tokenizer)
    lines = {doc.name: doc.text for doc in code_files()}[case.file].splitlines(keepends=True)
    assert case.target == lines[case.line_number - 1].strip() and len(case.target) >= 4
    prompt = tiny_tokenizer.decode(case.prompt)
    assert not prompt.endswith("\n")  # the model writes the newline and the indentation
    assert "".join(lines[: case.line_number - 1]).rstrip("\n").endswith(prompt)
    longest = max(len(tiny_tokenizer.encode(line, add_special_tokens=False)) for line in lines)
    assert 800 - longest <= len(case.prompt) <= 800
    assert CodeSpec.from_id(case.spec.id) == case.spec
    assert make_code_case(case.spec, tiny_tokenizer) == case


def test_edit_similarity():
    assert edit_similarity("return x", "return x") == 1.0
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("abc", "xyz") == 0.0
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("return x", "return y") == pytest.approx(1 - 1 / 8)


def test_first_line_stops_after_the_first_non_blank_line():
    pieces = ["\n", "    x = 1", "\n", "y"]
    stopper = FirstLine(lambda ids: "".join(pieces[i] for i in ids), eos_token_ids=[])
    seq = Sequence([0])
    for token in range(len(pieces)):
        stopper.advance(seq, token, is_last=False)
        if seq.finish_reason:
            break
    assert seq.finish_reason == "stop" and seq.token_ids == [0, 1, 2]
    assert first_line(seq.text) == "x = 1"
    assert first_line("\n\n  \n") == ""
    assert first_line("  # the rest of the cut line\n\n    return y\n") == "return y"


def test_first_line_ignores_the_rest_of_the_prompts_last_line():
    pieces = [" # end", "\n", "\n", "    y", "\n"]
    stopper = FirstLine(lambda ids: "".join(pieces[i] for i in ids), eos_token_ids=[])
    seq = Sequence([0])
    for token in range(len(pieces)):
        stopper.advance(seq, token, is_last=False)
        if seq.finish_reason:
            break
    assert seq.token_ids == [0, 1, 2, 3, 4] and first_line(seq.text) == "y"
