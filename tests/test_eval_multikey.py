"""Many questions of one document (`nanokv eval niah --needles K`): K distinct needles at K evenly
spaced depths of one text; context-only prefills and compresses the document once per (policy,
budget) and asks each question of a copy, so every answer equals the public `compress` + `chat`
of that question alone; the arena is not altered by asking; rows, summary and bad input."""

from __future__ import annotations

import re

import pytest
import torch
from test_eval_fixtures import (  # noqa: F401
    long_tiny_dir_fixture,
    long_tiny_llm_fixture,
    tiny_tokenizer_fixture,
)
from test_eval_niah import NEEDLE, _measured_depth, _prompt

from nanokv.arena import same_buffer
from nanokv.cli import main
from nanokv.engine import Engine
from nanokv.eval.ask import ask, build_prompt, compress
from nanokv.eval.grid import Grid
from nanokv.eval.niah import NiahSpec, make_case, needle_depths
from nanokv.eval.niah_jobs import document_cases, niah_jobs
from nanokv.eval.specs import engine_for, parse_spec
from nanokv.eval.summary import niah_section
from nanokv.sampling import SamplingParams

LENGTH = 700


def _cases(tokenizer, needles: int, seed: int = 0, filler: str = "neutral"):
    first = NiahSpec("single", filler, LENGTH, 0.0, seed, needles=needles)
    return [make_case(spec, tokenizer) for spec in document_cases(first)]


@pytest.mark.parametrize("needles", [2, 3, 5])
@pytest.mark.parametrize("filler", ["neutral", "prose"])
def test_k_needles_share_one_document_at_evenly_spaced_depths(tiny_tokenizer, needles, filler):
    cases = _cases(tiny_tokenizer, needles, filler=filler)
    assert len(cases) == needles
    assert len({case.document for case in cases}) == 1  # one text, K questions
    found = NEEDLE.findall(cases[0].document)
    assert len(found) == needles
    assert len({key for key, _ in found}) == needles  # distinct keys
    assert len({value for _, value in found}) == needles  # distinct values
    assert [case.spec.depth for case in cases] == list(needle_depths(needles))
    assert needle_depths(needles)[0] == 0.0 and needle_depths(needles)[-1] == 1.0
    asked = [case.expected[0] for case in cases]
    assert sorted(asked) == sorted(value for _, value in found)  # each needle asked once
    for case in cases:
        (value,) = case.expected
        key = found[[v for _, v in found].index(value)][0]
        assert key in case.question and key in case.answer_prefix
        # sized with the first needle's question, within a few tokens (five needles take 300
        # of the 700: the tiny tokenizer is nearly bytes); the other questions name keys of
        # other lengths, twice (the question and the answer prefix)
        slack = 4 if case.spec.depth == 0.0 else 12
        assert abs(_prompt(tiny_tokenizer, case).tokens - LENGTH) <= slack
        measured, tolerance = _measured_depth(tiny_tokenizer, case)
        assert abs(measured - case.spec.depth) <= tolerance, (case.spec.depth, measured)
    # needles sit in depth order from the top of the document
    spots = [cases[0].document.index(case.asked[0]) for case in cases]
    assert spots == sorted(spots)


def test_ids_name_a_question_of_a_document(tiny_tokenizer):
    spec = NiahSpec("single", "prose", 900, 0.5, 3, needles=3)
    assert spec.id == "niah/single/prose/L900/d0.5/s3/k3"
    assert NiahSpec.from_id(spec.id) == spec
    assert spec.document_id == "niah/single/prose/L900/s3/k3"
    assert {s.document_id for s in document_cases(spec)} == {spec.document_id}
    one = NiahSpec("single", "prose", 900, 0.5, 3)
    assert one.id == "niah/single/prose/L900/d0.5/s3" and one.document_id == one.id
    other = _cases(tiny_tokenizer, 3, seed=1)[0].document
    assert other != _cases(tiny_tokenizer, 3, seed=0)[0].document
    assert needle_depths(4) == (0.0, 0.3333, 0.6667, 1.0)
    four = NiahSpec("single", "neutral", 900, 0.3333, 0, needles=4)
    assert NiahSpec.from_id(four.id) == four  # depths round-trip through the id


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(needles=0), "--needles must be 1 to 16 needles"),
        (dict(needles=17), "--needles must be 1 to 16 needles"),
        (dict(needles=3, task="multikey"), "use --tasks single"),
        (dict(needles=3, depth=0.25), "depth 0.25 is none of them"),
    ],
)
def test_bad_many_needle_specs_raise(kwargs, message):
    fields = dict(task="single", filler="neutral", length=900, depth=0.0, seed=0) | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        NiahSpec(**fields)


class _Calls:
    """Counts Engine.record_prompt and Engine.start calls (the prompt pass, a compression)."""

    def __init__(self, monkeypatch):
        self.records, self.starts = 0, 0
        record, start = Engine.record_prompt, Engine.start

        def counted_record(engine, *args, **kwargs):
            self.records += 1
            return record(engine, *args, **kwargs)

        def counted_start(engine, *args, **kwargs):
            self.starts += 1
            return start(engine, *args, **kwargs)

        monkeypatch.setattr(Engine, "record_prompt", counted_record)
        monkeypatch.setattr(Engine, "start", counted_start)


POLICIES = ("full", "snapkv", "laprox", "needle-oracle:base=streaming")


def _grid(setting: str, needles: int = 3) -> Grid:
    return Grid(
        policies=POLICIES, budgets=(0.2,), lengths=(LENGTH,), seeds=(0,), fillers=("neutral",),
        settings=(setting,), needles=needles, min_cache=0,
    )  # fmt: skip


def test_context_only_compresses_a_document_once_for_all_its_questions(long_tiny_llm, monkeypatch):
    grid = _grid("context")
    jobs = niah_jobs(long_tiny_llm, grid)
    calls = _Calls(monkeypatch)
    rows = [job.run() | {"id": job.id} for job in jobs]
    runs = len(grid.runs())
    assert len(rows) == 3 * runs
    assert calls.records == 1  # one prompt pass (with the probe) for the document
    assert calls.starts == runs  # one compression per (policy, budget), not per question
    for policy in {row["policy"] for row in rows}:
        mine = [row for row in rows if row["policy"] == policy]
        assert [row["needle"] for row in mine] == [0, 1, 2]
        assert [row["depth"] for row in mine] == [0.0, 0.5, 1.0]
        assert len({row["expected"][0] for row in mine}) == 3
        assert len({row["case"] for row in mine}) == 3
        assert {row["document"] for row in mine} == {"niah/single/neutral/L700/s0/k3"}
        assert {row["kept_tokens"] for row in mine} == {mine[0]["kept_tokens"]}  # one arena
    oracle = [row for row in rows if row["policy"].startswith("needle-oracle")]
    assert all(min(row["needle_kept"]) == 1.0 for row in oracle)  # every asked value forced


def test_question_aware_prompts_each_question_with_the_document(long_tiny_llm, monkeypatch):
    grid = _grid("question")
    jobs = niah_jobs(long_tiny_llm, grid)
    calls = _Calls(monkeypatch)
    rows = [job.run() for job in jobs]
    assert len(rows) == 3 * len(grid.runs())
    assert calls.records == 3  # the question is part of the prompt: one pass each
    assert calls.starts == 3 * len(grid.runs())
    assert sorted({row["needle"] for row in rows}) == [0, 1, 2]


@pytest.mark.parametrize("policy", ["full", "snapkv", "laprox"])
def test_each_answer_equals_asking_that_question_alone(long_tiny_llm, policy):
    """One compression asked K questions in a row answers each as a fresh `LLM.compress` of
    the document asked that question alone (`LLM.chat(context=)`), and is left as it was. EOS
    is ignored and no stop string is set: every answer is max_new_tokens of real text."""
    llm, tokenizer = long_tiny_llm, long_tiny_llm.tokenizer
    cases = _cases(tokenizer, 3)
    prompts = [
        build_prompt(tokenizer, "context", c.document, c.question, c.answer_prefix) for c in cases
    ]
    new = 8
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    reserve = max(len(p.follow) for p in prompts) + new
    engine, _ = engine_for(llm, parse_spec(policy), 0.2, 0, "context")
    state = compress(engine, tokenizer, prompts[0], reserve)
    before = (state.arena.lengths.clone(), state.arena.k.clone(), state.positions.clone())
    mine = [ask(llm, engine, state, p, params) for p in prompts]
    assert torch.equal(state.arena.lengths, before[0]) and same_buffer(state.arena.k, before[1])
    assert torch.equal(state.positions, before[2])  # asking did not touch the compressed arena
    alone = []
    for case in cases:
        fresh = llm.compress(case.document, max_question_tokens=reserve - new, max_new_tokens=new)
        (out,) = llm.chat([case.question], params, context=fresh, answer_prefix=case.answer_prefix)
        assert len(out.token_ids) == new
        alone.append(out.text)
    assert mine == alone
    if policy != "full":
        assert float(state.arena.lengths.float().mean()) <= 0.2 * len(prompts[0].prefill) + 1


def test_one_needle_grid_is_todays(long_tiny_llm):
    """--needles 1 (the default) runs one prompt a case with the grid's depths, ids unchanged."""
    grid = Grid(
        policies=("full",), budgets=(0.2,), lengths=(LENGTH,), seeds=(0, 1), depths=(0.3,),
        fillers=("neutral",), settings=("context",),
    )  # fmt: skip
    jobs = niah_jobs(long_tiny_llm, grid)
    assert [job.id for job in jobs] == [
        "niah/single/neutral/L700/d0.3/s0|context|full|b1",
        "niah/single/neutral/L700/d0.3/s1|context|full|b1",
    ]
    row = jobs[0].run()
    assert "needles" not in row and "document" not in row and row["depth"] == 0.3


def _rows(seeds=(0, 1), needles=5) -> list[dict]:
    rows = []
    for seed in seeds:
        for i, depth in enumerate(needle_depths(needles)):
            spec = NiahSpec("single", "prose", 2048, depth, seed, needles=needles)
            for policy, budget, hit in (("full", 1.0, True), ("laprox", 0.1, i % 2 == 0)):
                rows.append({
                    "suite": "niah", "case": spec.id, "task": "single", "filler": "prose",
                    "length": 2048, "depth": depth, "seed": seed, "setting": "context",
                    "policy": policy, "budget": budget, "correct": hit, "score": float(hit),
                    "needles": needles, "needle": i, "document": spec.document_id,
                    "needle_kept": [1.0, 0.5],
                })  # fmt: skip
    return rows


def test_summary_counts_every_question_of_every_document():
    text = niah_section(_rows())
    assert "5 single needles a document, each asked in its own question (2 documents;" in text
    assert "10 cases a cell: 5 depths (0, 0.25, 0.5, 0.75, 1) x 2 seeds (0, 1)" in text
    assert "| `full` | 10/10 [72, 100] |" in text
    assert "| `laprox` | 6/10 [31, 83] |" in text  # needles 0, 2, 4 of both documents


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--needles", "0"], "--needles must be 1 to 16 needles a document, got 0"),
        (["--needles", "4", "--tasks", "multivalue"], "use --tasks single"),
        (["--needles", "4", "--depths", "0.5"], "drop --depths"),
    ],
)
def test_bad_needles_is_one_line_and_exit_2(long_tiny_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "eval"
    args = ["eval", "niah", "--setting", "context", "--model", str(long_tiny_dir)]
    status = main([*args, "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("nanokv: error:") and message in err and "\n" not in err
    assert not out.exists()


def test_cli_runs_k_questions_a_document(long_tiny_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "niah", "--setting", "context", "--needles", "3", "--model", str(long_tiny_dir)]
    args += ["--out", str(out), "--no-plots", "--lengths", str(LENGTH), "--seeds", "0"]
    args += ["--fillers", "neutral", "--budgets", "0.2", "--policies", "full", "snapkv"]
    assert main(args) == 0
    lines = (out / "niah.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3
    summary = (out / "summary.md").read_text()
    assert "3 single needles a document" in summary
    assert "3 cases a cell: 3 depths (0, 0.5, 1) x 1 seed (0)" in summary
