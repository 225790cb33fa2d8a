"""The suites as lists of jobs: every case x policy x budget (x setting for NIAH) of a grid.

Jobs are ordered case by case, so a case's prompt, its forward pass (`Engine.record_prompt`: the
pass does not depend on the policy, only what reaches the arena does) and, for fidelity, its
full-cache reference are computed once and reused by every policy and budget. `full` runs once
per case, at budget 1. Every row says whether the grid's cache floor, not the budget, set the
cache (`floored`). NIAH's jobs, which also share a compressed document between its questions,
are in niah_jobs.py.
"""

from __future__ import annotations

import time
from functools import lru_cache
from itertools import product

from nanokv.eval.ask import Prompt, answer
from nanokv.eval.chat import ChatSpec, converse, make_chat_case
from nanokv.eval.code import CodeSpec, FirstLine, edit_similarity, first_line, make_code_case
from nanokv.eval.fidelity import FidelitySpec, compare, make_fidelity_case, teacher_force
from nanokv.eval.grid import Grid
from nanokv.eval.niah_jobs import NEW_TOKENS as NIAH_TOKENS
from nanokv.eval.niah_jobs import niah_jobs
from nanokv.eval.niah_jobs import prompt_positions as _positions  # noqa: F401 (the old name)
from nanokv.eval.runner import Job
from nanokv.eval.specs import PolicySpec, engine_for, floor_fields, parse_spec
from nanokv.llm import LLM
from nanokv.sampling import SamplingParams

NEW_TOKENS = {**NIAH_TOKENS, "code": 48}


def fidelity_specs(grid: Grid) -> list[FidelitySpec]:
    if grid.cases:
        return [FidelitySpec.from_id(c) for c in grid.cases if c.startswith("fidelity/")]
    axes = (grid.texts, grid.lengths, grid.seeds)
    return [FidelitySpec(text, n, grid.tokens, seed) for text, n, seed in product(*axes)]


def code_specs(grid: Grid) -> list[CodeSpec]:
    if grid.cases:
        return [CodeSpec.from_id(c) for c in grid.cases if c.startswith("code/")]
    return [CodeSpec(length, seed) for length, seed in product(grid.lengths, grid.seeds)]


def fidelity_jobs(llm: LLM, grid: Grid) -> list[Job]:
    """Every fidelity case x (policy, budget); the full-cache reference is computed once a case."""
    full = parse_spec("full")

    @lru_cache(maxsize=1)
    def reference(spec: FidelitySpec):
        case = make_fidelity_case(spec, llm.tokenizer)
        record = llm.engine.record_prompt(case.context)
        engine, _ = engine_for(llm, full, 1.0)
        return case, record, teacher_force(engine, case, record)

    return _grid_jobs(
        fidelity_specs(grid), grid,
        lambda spec, policy, budget: _fidelity_run(
            llm, spec, (policy, budget, grid.min_cache), reference
        ),
    )  # fmt: skip


def _grid_jobs(specs, grid: Grid, make_run) -> list[Job]:
    """One job per case spec x (policy, budget), ids `case|policy|bBUDGET`."""
    jobs = []
    for spec in specs:
        for policy, budget in grid.runs():
            row_id = f"{spec.id}|{policy.label}|b{budget:g}"
            label = f"{policy.label} b={budget:g} {spec.id}"
            jobs.append(Job(row_id, label, make_run(spec, policy, budget)))
    return jobs


def _fidelity_run(llm: LLM, spec: FidelitySpec, cell: tuple[PolicySpec, float, int], reference):
    policy, budget, min_cache = cell

    def run() -> dict:
        case, record, full = reference(spec)  # computed by the case's first job, not timed below
        engine, _ = engine_for(llm, policy, budget, min_cache)
        began = time.perf_counter()
        trace = teacher_force(engine, case, record)
        seconds = round(time.perf_counter() - began, 3)
        return {
            "suite": "fidelity", "case": spec.id, "text": spec.source, "file": case.text_name,
            "length": spec.length, "tokens": spec.tokens, "seed": spec.seed,
            "policy": policy.label, "budget": budget, "kept_tokens": round(trace.kept_tokens, 2),
            "seconds": seconds, **compare(full, trace, case.continuation),
            **floor_fields(engine, policy, len(case.context), min_cache),
        }  # fmt: skip

    return run


def code_jobs(llm: LLM, grid: Grid) -> list[Job]:
    """Every code-completion case x (policy, budget)."""

    @lru_cache(maxsize=1)
    def case_for(spec: CodeSpec):
        case = make_code_case(spec, llm.tokenizer)
        return case, llm.engine.record_prompt(case.prompt)

    return _grid_jobs(
        code_specs(grid), grid,
        lambda spec, policy, budget: _code_run(
            llm, spec, (policy, budget, grid.min_cache), case_for
        ),
    )  # fmt: skip


def _code_run(llm: LLM, spec: CodeSpec, cell: tuple[PolicySpec, float, int], case_for):
    policy, budget, min_cache = cell

    def run() -> dict:
        (case, record), tokenizer = case_for(spec), llm.tokenizer
        engine, _ = engine_for(llm, policy, budget, min_cache)
        params = SamplingParams(max_new_tokens=NEW_TOKENS["code"])
        stopper = FirstLine(tokenizer.decode, llm.eos_token_ids)
        prompt = Prompt("question", case.prompt, [])
        outcome = answer(llm, engine, prompt, params, stopper=stopper, record=record)
        predicted = first_line(outcome.text)
        return {
            "suite": "code", "case": spec.id, "file": case.file, "line": case.line_number,
            "length": spec.length, "seed": spec.seed, "policy": policy.label, "budget": budget,
            "prompt_tokens": len(case.prompt), "target": case.target, "prediction": predicted,
            "similarity": round(edit_similarity(predicted, case.target), 4),
            "exact": predicted == case.target, "kept_tokens": round(outcome.kept_tokens, 2),
            "seconds": round(outcome.seconds, 3),
            **floor_fields(engine, policy, len(case.prompt), min_cache),
        }  # fmt: skip

    return run


def chat_specs(grid: Grid) -> list[ChatSpec]:
    if grid.cases:
        return [ChatSpec.from_id(c) for c in grid.cases if c.startswith("chat/")]
    cases = product(grid.facts, grid.lengths, grid.seeds)
    return [ChatSpec(length, seed, fact) for fact, length, seed in cases]


def chat_jobs(llm: LLM, grid: Grid) -> list[Job]:
    """Every scripted conversation x (policy, budget); `full` (nothing evicted) is the
    reference the summary pairs the others with."""
    case_for = lru_cache(maxsize=1)(lambda spec: make_chat_case(spec, llm.tokenizer))
    return _grid_jobs(
        chat_specs(grid), grid,
        lambda spec, policy, budget: _chat_run(
            llm, spec, (policy, budget, grid.min_cache), case_for
        ),
    )  # fmt: skip


def _chat_run(llm: LLM, spec: ChatSpec, cell: tuple[PolicySpec, float, int], case_for):
    policy, budget, min_cache = cell

    def run() -> dict:
        case = case_for(spec)
        # configures the LLM's policy and budget, which a conversation compresses with
        engine, _ = engine_for(llm, policy, budget, min_cache, "context")
        outcome = converse(llm.conversation(), case)
        return {
            "suite": "chat", "case": spec.id, "length": spec.length, "seed": spec.seed,
            "fact": spec.fact, "fact_turn": case.fact_turn + 1,  # 1: the first turn
            "policy": policy.label, "budget": budget, "turns": len(case.turns),
            "expected": [case.value], "answer": outcome.answers[-1],
            "correct": outcome.correct, "answers": list(outcome.answers),
            "tokens_seen": outcome.tokens_seen, "kept_tokens": round(outcome.kept_tokens, 2),
            "fact_kept": [round(s, 4) for s in outcome.fact_kept],
            "sources": list(case.sources), "seconds": round(outcome.seconds, 3),
            **floor_fields(engine, policy, outcome.tokens_seen, min_cache),
        }  # fmt: skip

    return run


SUITE_JOBS = {"niah": niah_jobs, "fidelity": fidelity_jobs, "code": code_jobs, "chat": chat_jobs}
