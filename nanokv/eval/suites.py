"""The three suites as lists of jobs: every case x policy x budget (x setting for NIAH) of a grid.

Jobs are ordered case by case, so a case's prompt, its forward pass (`Engine.record_prompt`: the
pass does not depend on the policy, only what reaches the arena does) and, for fidelity, its
full-cache reference are computed once and reused by every policy and budget. `full` runs once
per case, at budget 1. Every row says whether the grid's cache floor, not the budget, set the
cache (`floored`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from itertools import product

import torch

from nanokv.engine import Engine, PromptRecord
from nanokv.eval.ask import Prompt, answer, build_prompt, probe_for
from nanokv.eval.code import CodeSpec, FirstLine, edit_similarity, first_line, make_code_case
from nanokv.eval.fidelity import FidelitySpec, compare, make_fidelity_case, teacher_force
from nanokv.eval.grid import Grid
from nanokv.eval.niah import NiahCase, NiahSpec, make_case, score
from nanokv.eval.runner import Job
from nanokv.eval.specs import PolicySpec, engine_for, parse_spec
from nanokv.eval.tokens import token_span
from nanokv.llm import LLM
from nanokv.sampling import SamplingParams

NEW_TOKENS = {"single": 12, "multikey": 12, "multivalue": 40, "code": 48}


def runs(grid: Grid) -> list[tuple[PolicySpec, float]]:
    """(policy, budget) pairs in grid order; `full` once, at budget 1."""
    pairs = []
    for spec in grid.specs():
        budgets = (1.0,) if spec.is_full else grid.budgets
        pairs += [(spec, budget) for budget in budgets]
    return pairs


def niah_specs(grid: Grid) -> list[NiahSpec]:
    """The grid's cases, or only those `grid.cases` names."""
    if grid.cases:
        return [NiahSpec.from_id(c) for c in grid.cases if c.startswith("niah/")]
    axes = (grid.tasks, grid.fillers, grid.lengths, grid.depths, grid.seeds)
    return [NiahSpec(*values) for values in product(*axes)]


def fidelity_specs(grid: Grid) -> list[FidelitySpec]:
    if grid.cases:
        return [FidelitySpec.from_id(c) for c in grid.cases if c.startswith("fidelity/")]
    axes = (grid.texts, grid.lengths, grid.seeds)
    return [FidelitySpec(text, n, grid.tokens, seed) for text, n, seed in product(*axes)]


def code_specs(grid: Grid) -> list[CodeSpec]:
    if grid.cases:
        return [CodeSpec.from_id(c) for c in grid.cases if c.startswith("code/")]
    return [CodeSpec(length, seed) for length, seed in product(grid.lengths, grid.seeds)]


def niah_jobs(llm: LLM, grid: Grid) -> list[Job]:
    """Every NIAH case x setting x (policy, budget)."""
    case_for = lru_cache(maxsize=1)(lambda spec: make_case(spec, llm.tokenizer))

    @lru_cache(maxsize=1)
    def prompt_for(spec: NiahSpec, setting: str) -> tuple[Prompt, PromptRecord]:
        case = case_for(spec)
        doc, question, prefix = case.document, case.question, case.answer_prefix
        prompt = build_prompt(llm.tokenizer, setting, doc, question, prefix)
        # context-only compresses as LLM.compress does: the record holds KVzip's probe too
        probe = probe_for(llm.engine, llm.tokenizer, prompt) if setting == "context" else None
        return prompt, llm.engine.record_prompt(prompt.prefill, probe=probe)

    jobs = []
    for spec in niah_specs(grid):
        for setting, (policy, budget) in product(grid.settings, runs(grid)):
            row_id = f"{spec.id}|{setting}|{policy.label}|b{budget:g}"
            label = f"{setting} {policy.label} b={budget:g} {spec.id}"
            cell = (policy, budget, grid.min_cache)
            run = _niah_run(llm, spec, setting, cell, case_for, prompt_for)
            jobs.append(Job(row_id, label, run))
    return jobs


def _niah_run(
    llm: LLM,
    spec: NiahSpec,
    setting: str,
    cell: tuple[PolicySpec, float, int],
    case_for: Callable[[NiahSpec], NiahCase],
    prompt_for: Callable[[NiahSpec, str], tuple[Prompt, PromptRecord]],
) -> Callable[[], dict]:
    policy, budget, min_cache = cell

    def run() -> dict:
        case, tokenizer = case_for(spec), llm.tokenizer
        prompt, record = prompt_for(spec, setting)  # shared by the case's jobs
        values = _positions(tokenizer, prompt, case.expected)
        engine, oracle = engine_for(llm, policy, budget, min_cache, setting)
        if oracle is not None:
            # the value's digits and the period that ends them: without it the model runs on
            # past the last digit ("87874411")
            ended = tuple(f"{value}." for value in case.expected)
            oracle.forced = torch.tensor(_positions(tokenizer, prompt, ended))
        params = SamplingParams(max_new_tokens=NEW_TOKENS[spec.task], stop=["\n"])
        outcome = answer(
            engine, tokenizer, llm.eos_token_ids, prompt, params, track=values, record=record
        )
        result = score(outcome.text, case.expected)
        return {
            "suite": "niah", "case": spec.id, "task": spec.task, "filler": spec.filler,
            "length": spec.length, "depth": spec.depth, "seed": spec.seed, "setting": setting,
            "policy": policy.label, "budget": budget, "prompt_tokens": prompt.tokens,
            "expected": list(case.expected), "answer": outcome.text, "score": result,
            "correct": result == 1.0, "kept_tokens": round(outcome.kept_tokens, 2),
            "needle_kept": [round(s, 4) for s in outcome.tracked_kept],
            "sources": list(case.sources), "seconds": round(outcome.seconds, 3),
            **_floor_fields(engine, policy, len(prompt.prefill), min_cache),
        }  # fmt: skip

    return run


def _floor_fields(engine: Engine, policy: PolicySpec, length: int, min_cache: int) -> dict:
    """`min_cache` and whether the floor, not the budget, set this row's cache."""
    floored = not policy.is_full and engine.eviction.is_floored(length)
    return {"min_cache": min_cache, "floored": floored}


def _positions(tokenizer, prompt: Prompt, texts: tuple[str, ...]) -> list[int]:
    """Prefill token positions that cover each of `texts` (the needle's values or sentences)."""
    positions: list[int] = []
    for text in texts:
        start, end = token_span(tokenizer, prompt.prefill, text)
        positions += range(start, end)
    return positions


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
        for policy, budget in runs(grid):
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
            **_floor_fields(engine, policy, len(case.context), min_cache),
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
        outcome = answer(
            engine, tokenizer, llm.eos_token_ids, prompt, params, stopper=stopper, record=record
        )
        predicted = first_line(outcome.text)
        return {
            "suite": "code", "case": spec.id, "file": case.file, "line": case.line_number,
            "length": spec.length, "seed": spec.seed, "policy": policy.label, "budget": budget,
            "prompt_tokens": len(case.prompt), "target": case.target, "prediction": predicted,
            "similarity": round(edit_similarity(predicted, case.target), 4),
            "exact": predicted == case.target, "kept_tokens": round(outcome.kept_tokens, 2),
            "seconds": round(outcome.seconds, 3),
            **_floor_fields(engine, policy, len(case.prompt), min_cache),
        }  # fmt: skip

    return run


SUITE_JOBS = {"niah": niah_jobs, "fidelity": fidelity_jobs, "code": code_jobs}
