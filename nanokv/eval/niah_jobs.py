"""NIAH jobs: every case x setting x (policy, budget), run document by document.

The prompt's forward pass does not depend on the policy (`Engine.record_prompt`), so it runs once
and every policy's arena is filled from it: once a case in the question-aware setting (the
question is part of what is prefilled), once a document in the context-only setting (the
document alone is). A document of K needles (`--needles K`) has K cases, one question each:

- context-only: per (policy, budget) the document is compressed once (`ask.compress`, room kept
  for the longest of its questions), then each question extends a copy of that arena
  (`ask.ask`) -- what `LLM.compress` + `LLM.chat(..., context=)` do -- so the K jobs of a
  (document, policy, budget) run one after another and share it; the first one's time holds
  the compression;
- question-aware: each question is its own prompt, compressed with its question (SnapKV's
  setting): K prefills a document.

With one needle a document (the default) both come down to one prompt a case, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import product
from typing import Generic, TypeVar

import torch

from nanokv.engine import DecodeState, Engine, PromptRecord
from nanokv.eval.ask import (
    Prompt,
    answer,
    ask,
    build_prompt,
    compress,
    kept_share,
    kept_tokens,
    probe_for,
)
from nanokv.eval.grid import Grid
from nanokv.eval.niah import NiahCase, NiahSpec, make_case, needle_depths, score
from nanokv.eval.runner import Job
from nanokv.eval.specs import PolicySpec, engine_for, floor_fields
from nanokv.eval.tokens import token_positions
from nanokv.llm import LLM
from nanokv.sampling import SamplingParams
from nanokv.tokenizer import Tokenizer

NEW_TOKENS = {"single": 12, "multikey": 12, "multivalue": 40}
Cell = tuple[PolicySpec, float, int]  # policy, budget, cache floor
Value = TypeVar("Value")


def niah_specs(grid: Grid) -> list[NiahSpec]:
    """The grid's cases, or only those `grid.cases` names. With K needles a document the depths
    are the K needles' (`needle_depths`), not the grid's."""
    if grid.cases:
        return [NiahSpec.from_id(c) for c in grid.cases if c.startswith("niah/")]
    depths = needle_depths(grid.needles) or grid.depths
    axes = (grid.tasks, grid.fillers, grid.lengths, depths, grid.seeds)
    return [NiahSpec(*values, needles=grid.needles) for values in product(*axes)]


def niah_documents(grid: Grid) -> list[list[NiahSpec]]:
    """The grid's cases grouped by document (one case a document with one needle), in order."""
    documents: dict[str, list[NiahSpec]] = {}
    for spec in niah_specs(grid):
        documents.setdefault(spec.document_id, []).append(spec)
    return list(documents.values())


def document_cases(spec: NiahSpec) -> list[NiahSpec]:
    """Every case of `spec`'s document (all its questions), whichever of them a grid runs."""
    return [replace(spec, depth=depth) for depth in needle_depths(spec.needles)] or [spec]


@dataclass
class _Compressed:
    """One document compressed once for a (policy, budget), asked by several jobs."""

    engine: Engine
    state: DecodeState  # never extended: each question runs on a copy
    length: int  # tokens prefilled


class _Latest(Generic[Value]):
    """The value of the last key asked for: the jobs that share one run one after another, so
    only it is kept (a record or a compressed arena is large)."""

    def __init__(self) -> None:
        self.key: object = None
        self.value: Value | None = None

    def get(self, key: object, make: Callable[[], Value]) -> Value:
        if key != self.key:
            self.key, self.value = None, None  # free the old value before making the new
            self.value, self.key = make(), key
        return self.value


def niah_jobs(llm: LLM, grid: Grid) -> list[Job]:
    """Every NIAH case x setting x (policy, budget), document by document; context-only runs
    a document's questions after each other for each (policy, budget)."""
    documents = niah_documents(grid)
    questions = max((spec.needles for document in documents for spec in document), default=1)
    work = _NiahWork(llm, questions)
    jobs = []
    for document in documents:
        for setting in grid.settings:
            if setting == "context":  # a (policy, budget)'s questions share one compression
                order = [(spec, run) for run in grid.runs() for spec in document]
            else:
                order = [(spec, run) for spec in document for run in grid.runs()]
            for spec, (policy, budget) in order:
                row_id = f"{spec.id}|{setting}|{policy.label}|b{budget:g}"
                label = f"{setting} {policy.label} b={budget:g} {spec.id}"
                cell = (policy, budget, grid.min_cache)
                jobs.append(Job(row_id, label, work.job(spec, setting, cell)))
    return jobs


class _NiahWork:
    """What the jobs of a grid share: cases, prompt records and compressed documents."""

    def __init__(self, llm: LLM, questions: int) -> None:
        """`questions`: the most questions a document has (a document's cases are kept)."""
        self.llm, self.tokenizer = llm, llm.tokenizer
        self.case = lru_cache(maxsize=questions)(lambda spec: make_case(spec, self.tokenizer))
        self.records: _Latest[PromptRecord] = _Latest()
        self.compressions: _Latest[_Compressed] = _Latest()

    def prompt(self, spec: NiahSpec, setting: str) -> Prompt:
        case = self.case(spec)
        doc, question, prefix = case.document, case.question, case.answer_prefix
        return build_prompt(self.tokenizer, setting, doc, question, prefix)

    def record(self, spec: NiahSpec, setting: str) -> PromptRecord:
        """The prompt's recorded pass: a case's question-aware, a document's context-only (with
        KVzip's probe too, as LLM.compress runs it)."""
        key = (setting, spec.document_id if setting == "context" else spec.id)

        def make() -> PromptRecord:
            prompt, engine = self.prompt(spec, setting), self.llm.engine
            probe = probe_for(engine, self.tokenizer, prompt) if setting == "context" else None
            return engine.record_prompt(prompt.prefill, probe=probe)

        return self.records.get(key, make)

    def job(self, spec: NiahSpec, setting: str, cell: Cell) -> Callable[[], dict]:
        if setting == "context":
            return lambda: self._context_row(spec, cell)
        return lambda: self._question_row(spec, cell)

    def _question_row(self, spec: NiahSpec, cell: Cell) -> dict:
        """The question-aware case: its prompt compressed with the question, then answered."""
        policy, budget, min_cache = cell
        case, prompt = self.case(spec), self.prompt(spec, "question")
        record = self.record(spec, "question")
        engine, oracle = engine_for(self.llm, policy, budget, min_cache, "question")
        if oracle is not None:
            oracle.forced = torch.tensor(_forced(self.tokenizer, prompt, [case]))
        params = SamplingParams(max_new_tokens=NEW_TOKENS[spec.task], stop=["\n"])
        values = prompt_positions(self.tokenizer, prompt, case.expected)
        outcome = answer(self.llm, engine, prompt, params, track=values, record=record)
        fields = floor_fields(engine, policy, len(prompt.prefill), min_cache)
        return _row(case, "question", cell, prompt, outcome.text, fields) | {
            "kept_tokens": round(outcome.kept_tokens, 2),
            "needle_kept": [round(s, 4) for s in outcome.tracked_kept],
            "sources": list(case.sources), "seconds": round(outcome.seconds, 3),
        }  # fmt: skip

    def _context_row(self, spec: NiahSpec, cell: Cell) -> dict:
        """The context-only case: its question asked of the document's shared compression."""
        policy, budget, min_cache = cell
        case, prompt = self.case(spec), self.prompt(spec, "context")
        record = self.record(spec, "context")
        began = time.perf_counter()
        key = (spec.document_id, policy.label, budget, min_cache)
        shared = self.compressions.get(key, lambda: self._compress(spec, cell, record))
        values = prompt_positions(self.tokenizer, prompt, case.expected)
        params = SamplingParams(max_new_tokens=NEW_TOKENS[spec.task], stop=["\n"])
        text = ask(self.llm, shared.engine, shared.state, prompt, params)
        fields = floor_fields(shared.engine, policy, shared.length, min_cache)
        return _row(case, "context", cell, prompt, text, fields) | {
            "kept_tokens": round(kept_tokens(shared.state), 2),
            "needle_kept": [round(s, 4) for s in kept_share(shared.state, values)],
            "sources": list(case.sources), "seconds": round(time.perf_counter() - began, 3),
        }  # fmt: skip

    def _compress(self, spec: NiahSpec, cell: Cell, record: PromptRecord) -> _Compressed:
        """`spec`'s document compressed for `cell`, with room for its longest question and
        answer; the needle oracle forces the values of all its questions."""
        policy, budget, min_cache = cell
        cases = [self.case(other) for other in document_cases(spec)]
        prompts = [self.prompt(other, "context") for other in document_cases(spec)]
        if any(prompt.prefill != prompts[0].prefill for prompt in prompts):
            raise RuntimeError(f"the questions of {spec.document_id} see different documents")
        engine, oracle = engine_for(self.llm, policy, budget, min_cache, "context")
        if oracle is not None:
            oracle.forced = torch.tensor(_forced(self.tokenizer, prompts[0], cases))
        reserve = max(len(p.follow) for p in prompts) + NEW_TOKENS[spec.task]
        state = compress(engine, self.tokenizer, prompts[0], reserve, record)
        return _Compressed(engine, state, len(prompts[0].prefill))


def prompt_positions(tokenizer: Tokenizer, prompt: Prompt, texts: tuple[str, ...]) -> list[int]:
    """Prefill token positions that cover each of `texts` (a needle's values or sentences)."""
    return token_positions(tokenizer, prompt.prefill, texts)


def _forced(tokenizer: Tokenizer, prompt: Prompt, cases: list[NiahCase]) -> list[int]:
    """What the needle oracle keeps: each asked value's digits and the period that ends them
    (without it the model runs on past the last digit, "87874411")."""
    ended = tuple(f"{value}." for case in cases for value in case.expected)
    return prompt_positions(tokenizer, prompt, ended)


def _row(case: NiahCase, setting: str, cell: Cell, prompt: Prompt, text: str, floor: dict) -> dict:
    """The fields every NIAH row has; a many-needle document's rows also name the document and
    which of its needles (0: the first from the top) the case asks."""
    spec, (policy, budget, _) = case.spec, cell
    result = score(text, case.expected)
    row = {
        "suite": "niah", "case": spec.id, "task": spec.task, "filler": spec.filler,
        "length": spec.length, "depth": spec.depth, "seed": spec.seed, "setting": setting,
        "policy": policy.label, "budget": budget, "prompt_tokens": prompt.tokens,
        "expected": list(case.expected), "answer": text, "score": result,
        "correct": result == 1.0, **floor,
    }  # fmt: skip
    if spec.needles > 1:
        needle = needle_depths(spec.needles).index(spec.depth)
        row |= {"needles": spec.needles, "needle": needle, "document": spec.document_id}
    return row
