"""The chat suite (`nanokv eval chat`): a scripted conversation of exactly ten user turns -- the
fact in turn 1 (or inside an early passage), eight filler turns on prose passages, the question
in turn 10 -- run through `Conversation` (compressed back to the budget after every answer); the
rows, the full cache as reference, the summary paired with it, the presets and bad input."""

from __future__ import annotations

import argparse
import json
import re

import pytest
from test_eval_fixtures import (  # noqa: F401
    long_tiny_dir_fixture,
    long_tiny_llm_fixture,
    tiny_tokenizer_fixture,
)

from nanokv.cli import main
from nanokv.conversation import Conversation
from nanokv.eval import chat as chat_suite
from nanokv.eval.chat import (
    FILLER_ANSWER_TOKENS,
    FILLER_TASKS,
    GREETING,
    QUESTION_ANSWER_TOKENS,
    ChatSpec,
    converse,
    make_chat_case,
)
from nanokv.eval.cli import add_eval_parser, grids
from nanokv.eval.grid import FULL, QUICK, Grid
from nanokv.eval.suites import chat_jobs, chat_specs
from nanokv.eval.summary import chat_section, write_summary
from nanokv.eval.tokens import counter

LENGTH = 1200  # the tiny tokenizer is nearly byte-level: ~80 tokens a passage


def test_the_script_is_ten_turns_fact_first_question_last(tiny_tokenizer):
    count = counter(tiny_tokenizer)
    cases = [make_chat_case(ChatSpec(LENGTH, seed), tiny_tokenizer) for seed in range(3)]
    for case in cases:
        assert len(case.turns) == 10
        fact, *fillers, question = case.turns
        assert re.fullmatch(r"\d{7}", case.value)
        assert case.value in fact and case.name in fact
        assert case.name in question and case.value not in question
        assert all(case.value not in turn and case.name not in turn for turn in fillers)
        tasks = [turn.split("\n\n", 1)[0] for turn in fillers]
        assert len(set(tasks)) == 8 and set(tasks) <= set(FILLER_TASKS)
        passages = [turn.split("\n\n", 1)[1] for turn in fillers]
        assert len(set(passages)) == 8 and all(count(p) >= 16 for p in passages)
        # each passage ends at a word boundary, short of its share by less than a word; the
        # prose stream includes the installed distributions' texts, whose words can be long
        # (a URL, a rule of dashes: 21 tokens short in one passage of seed 2 with torch 2.13's
        # license files), so the whole is bounded, not each passage
        assert 0.9 * LENGTH <= sum(count(turn) for turn in case.turns) <= LENGTH
        assert case.sources  # where the passages came from
        assert case.fact_turn == 0
    assert len({case.value for case in cases}) == 3
    assert len({case.turns[1] for case in cases}) == 3  # each seed its own passages


def test_inside_the_fact_is_one_sentence_of_an_early_passage(tiny_tokenizer):
    count = counter(tiny_tokenizer)
    cases = [make_chat_case(ChatSpec(LENGTH, seed, "inside"), tiny_tokenizer) for seed in range(8)]
    for case in cases:
        greeting, *fillers, question = case.turns
        sentence = f"The locker code of {case.name} is {case.value}."
        assert greeting == GREETING and case.fact_turn in (1, 2, 3)
        holders = [turn for turn, text in enumerate(case.turns) if case.value in text]
        assert holders == [case.fact_turn] and case.turns[case.fact_turn].count(sentence) == 1
        task, passage = case.turns[case.fact_turn].split("\n\n", 1)
        assert task in FILLER_TASKS and sentence in passage and passage != sentence
        before, after = passage.split(sentence)  # at a sentence boundary of the prose
        assert (before + after).strip() and before[-1:] in ("", " ") and after[:1] in ("", " ")
        assert all(case.name not in text for text in case.turns[: case.fact_turn])
        assert case.name in question and case.value not in question
        assert abs(sum(count(turn) for turn in case.turns) - LENGTH) <= 8 * 6
    assert {case.fact_turn for case in cases} == {1, 2, 3}  # the seeds move it
    first = make_chat_case(ChatSpec(LENGTH, 0), tiny_tokenizer)
    assert cases[0].value != first.value  # a case of its own, not the first case moved


def test_a_case_is_reproducible_from_its_id(tiny_tokenizer):
    spec = ChatSpec(1024, 3)
    assert spec.id == "chat/L1024/s3" and ChatSpec.from_id(spec.id) == spec
    assert make_chat_case(spec, tiny_tokenizer) == make_chat_case(spec, tiny_tokenizer)
    inside = ChatSpec(1024, 3, "inside")
    assert inside.id == "chat/L1024/s3/inside" and ChatSpec.from_id(inside.id) == inside
    assert make_chat_case(inside, tiny_tokenizer) == make_chat_case(inside, tiny_tokenizer)
    with pytest.raises(ValueError, match="not a chat case id"):
        ChatSpec.from_id("chat/1024/s3")
    with pytest.raises(ValueError, match="not a chat case id"):
        ChatSpec.from_id("chat/L1024/s3/middle")
    with pytest.raises(ValueError, match="unknown chat fact 'middle'"):
        ChatSpec(1024, 3, "middle")


@pytest.mark.parametrize("fact", ["first", "inside"])
def test_the_fact_held_is_measured_at_the_codes_own_positions(long_tiny_llm, monkeypatch, fact):
    llm = long_tiny_llm
    llm.configure("full")
    case = make_chat_case(ChatSpec(LENGTH, 1, fact), llm.tokenizer)
    asked = []
    monkeypatch.setattr(
        chat_suite, "kept_share", lambda state, positions: asked.append(positions) or [1.0]
    )
    conversation = llm.conversation()
    converse(conversation, case)
    (positions,) = asked
    ids = conversation._ids  # the conversation's tokens, by position
    assert llm.tokenizer.decode([ids[p] for p in positions]).strip() == case.value
    assert positions == list(range(positions[0], positions[-1] + 1))


def _sent(monkeypatch) -> list[tuple[str, int]]:
    """(text, max_new_tokens) of every Conversation.send from now on."""
    sent, send = [], Conversation.send

    def spy(self, text, params=None, on_text=None):
        sent.append((text, params.max_new_tokens))
        return send(self, text, params, on_text)

    monkeypatch.setattr(Conversation, "send", spy)
    return sent


def test_conversations_run_the_script_and_full_is_the_reference(long_tiny_llm, monkeypatch):
    llm = long_tiny_llm
    grid = Grid(
        policies=("full", "streaming", "laprox"), budgets=(0.2,), lengths=(LENGTH,), seeds=(0,),
        min_cache=0,
    )  # fmt: skip
    jobs = chat_jobs(llm, grid)
    assert [job.id for job in jobs] == [
        "chat/L1200/s0|full|b1", "chat/L1200/s0|streaming|b0.2", "chat/L1200/s0|laprox|b0.2",
    ]  # fmt: skip
    sent = _sent(monkeypatch)
    rows = [job.run() for job in jobs]
    case = make_chat_case(ChatSpec(LENGTH, 0), llm.tokenizer)
    assert [text for text, _ in sent] == list(case.turns) * 3  # ten turns each, in order
    tokens = [FILLER_ANSWER_TOKENS] * 9 + [QUESTION_ANSWER_TOKENS]
    assert [new for _, new in sent] == tokens * 3
    layers = llm.config.num_layers
    for row in rows:
        assert row["suite"] == "chat" and row["turns"] == 10 and len(row["answers"]) == 10
        assert row["answer"] == row["answers"][-1] and row["expected"] == [case.value]
        assert row["correct"] == (case.value in re.findall(r"\d+", row["answer"]))
        assert row["tokens_seen"] > LENGTH and len(row["fact_kept"]) == layers
        assert row["floored"] is False and row["min_cache"] == 0
        assert row["fact"] == "first" and row["fact_turn"] == 1
    full, streaming, laprox = rows
    assert full["kept_tokens"] == full["tokens_seen"] and full["fact_kept"] == [1.0] * layers
    for row in (streaming, laprox):  # compressed back to 20% of the tokens seen
        assert abs(row["kept_tokens"] - 0.2 * row["tokens_seen"]) <= 1
    assert streaming["fact_kept"] == [0.0] * layers  # sinks + recent: turn 1 is long gone


def chat_row(policy: str, budget: float, seed: int, correct: bool) -> dict:
    """A chat row as suites.py writes it (the fields the summary reads)."""
    case = f"chat/L1024/s{seed}"
    return {
        "id": f"{case}|{policy}|b{budget:g}", "suite": "chat", "case": case, "length": 1024,
        "seed": seed, "policy": policy, "budget": budget, "correct": correct,
        "fact_kept": [1.0, 0.5] if correct else [0.0, 0.0], "sources": ["stdlib/LICENSE.txt"],
        "seconds": 2.0,
    }  # fmt: skip


def chat_rows() -> list[dict]:
    """10 conversations: full misses seeds 8, 9; laprox hits 0-6 and 9; streaming none."""
    rows = [chat_row("full", 1.0, s, s < 8) for s in range(10)]
    rows += [chat_row("laprox", 0.1, s, s < 7 or s == 9) for s in range(10)]
    return rows + [chat_row("streaming", 0.1, s, False) for s in range(10)]


def _cells(text: str, policy: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| `{policy}` |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_summary_counts_hits_and_pairs_them_with_the_full_cache():
    text = chat_section(chat_rows())
    assert "10 conversations a cell: 10 seeds (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)" in text
    every, paired = text.split("Among the conversations")
    assert _cells(every, "full") == ["8/10 [49, 94]"]
    assert _cells(every, "laprox") == ["8/10 [49, 94]"]
    assert _cells(every, "streaming") == ["0/10 [0, 28]"]
    assert "where the full cache recalled the fact (8 of 10)" in text
    assert _cells(paired, "full") == ["8/8 [68, 100]"]
    assert _cells(paired, "laprox") == ["7/8 [53, 98]"]  # seed 9 does not count: full missed it
    assert _cells(paired.split("Fact held")[1], "laprox") == ["60 (min 40)"]


def test_summary_has_a_part_for_each_place_of_the_fact():
    inside = [
        {**row, "case": row["case"] + "/inside", "fact": "inside", "correct": not row["correct"]}
        for row in chat_rows()
    ]
    text = chat_section(chat_rows() + inside)
    first, later = text.split("## Recall across a conversation (chat) -- fact inside")
    assert "## Recall across a conversation (chat) -- fact first" in first
    assert "stated in turn 1" in first and "inside the passage of turn 2, 3 or 4" in later
    assert _cells(first, "full") == ["8/10 [49, 94]"]
    assert _cells(later, "full") == ["2/10 [6, 51]"]
    assert "where the full cache recalled the fact (2 of 10)" in later
    assert "fact first" not in chat_section(chat_rows())  # one place: no part titles


def test_summary_file_has_the_chat_section_sources_and_time(tmp_path):
    text = write_summary(tmp_path, {"chat": chat_rows()}).read_text()
    assert "## Recall across a conversation (chat)" in text
    assert "Chat passages: `stdlib/LICENSE.txt`." in text
    assert "- chat: 30 rows, 60 s of case time" in text


def _grids(*argv: str):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    return grids(parser.parse_args(["eval", *argv]))


def test_presets_hold_ten_conversations_a_cell_and_all_leaves_chat_out():
    full, quick = FULL["chat"], QUICK["chat"]
    assert len(full.seeds) >= 10 and 0.1 in full.budgets and "full" in full.policies
    assert len(full.lengths) == 1 and len(quick.seeds) == 1
    assert "full" in quick.policies and quick.budgets == (0.1,)
    assert set(_grids("all")) == {"niah", "fidelity", "code"}
    assert set(_grids("chat")) == {"chat"}
    chosen = _grids("all", "--cases", "chat/L1024/s0", "--policies", "full", "quest")
    assert set(chosen) == {"chat"} and chosen["chat"].policies == ("full",)
    assert full.facts == quick.facts == ("first",)
    facts = _grids("chat", "--facts", "first", "inside", "--seeds", "0", "1")["chat"]
    ids = [spec.id for spec in chat_specs(facts)]
    assert ids == ["chat/L1024/s0", "chat/L1024/s1", "chat/L1024/s0/inside", "chat/L1024/s1/inside"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--policies", "quest"], "a conversation does not run Quest"),
        (["--policies", "snapkv+quest"], "a conversation does not run Quest"),
        (["--policies", "needle-oracle"], "needle-oracle has no needle"),
        (["--policies", "laprox:observe=last"], "scores with KVzip's probe"),
        (["--lengths", "100"], "chat length 100 is too short"),
        (["--lengths", "4000"], "more than the model's 4096-token context"),
        (["--cases", "chat/L1024"], "not a chat case id"),
        (["--facts", "middle"], "unknown chat fact 'middle'; choose from first, inside"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(long_tiny_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "eval"
    status = main(["eval", "chat", "--model", str(long_tiny_dir), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("nanokv: error:") and message in err and "\n" not in err
    assert not out.exists()


def test_cli_writes_rows_and_the_summary(long_tiny_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "chat", "--model", str(long_tiny_dir), "--out", str(out), "--no-plots"]
    args += ["--lengths", str(LENGTH), "--seeds", "0", "--budgets", "0.2", "--min-cache", "0"]
    assert main([*args, "--policies", "full", "streaming"]) == 0
    rows = [json.loads(line) for line in (out / "chat.jsonl").read_text().splitlines()]
    assert [row["policy"] for row in rows] == ["full", "streaming"]
    summary = (out / "summary.md").read_text()
    assert "## Recall across a conversation (chat)" in summary
    assert "1 conversation a cell: 1 seed (0)" in summary


def test_cli_runs_the_fact_inside(long_tiny_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "chat", "--model", str(long_tiny_dir), "--out", str(out), "--no-plots"]
    args += ["--lengths", str(LENGTH), "--seeds", "2", "--facts", "inside", "--policies", "full"]
    assert main(args) == 0
    (row,) = [json.loads(line) for line in (out / "chat.jsonl").read_text().splitlines()]
    assert row["case"] == "chat/L1200/s2/inside" and row["fact"] == "inside"
    assert row["fact_turn"] in (2, 3, 4) and row["fact_kept"] == [1.0] * len(row["fact_kept"])
    assert "stated in one sentence inside the passage" in (out / "summary.md").read_text()
