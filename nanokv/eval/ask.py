"""Asking a question about a document in the two settings, through the engine's public API.

- question-aware: the document and the question are one user message, prefilled and compressed
  together (SnapKV's setting) -- what `LLM.chat(..., answer_prefix=...)` does;
- context-only: the document alone is prefilled and compressed, then the question, the chat
  template's tail and the answer prefix extend the compressed arena with nothing evicted
  (kvpress's setting) -- what `LLM.compress` + `LLM.chat(..., context=...)` do.

The answers run as requests through the LLM's scheduler (the server's path), each with the
eval's own engine (a policy wrapper such as the needle oracle), a recorded prompt pass shared by
the policies of a grid, and a look at the arena after compression (which tokens survived); a
context-only document is compressed once (`compress`, as `LLM.compress`) and asked many times. A
test checks that the answers equal those of the `LLM` calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nanokv.context import split_context
from nanokv.engine import DecodeState, Engine, PromptRecord
from nanokv.probe import Probe
from nanokv.sampling import SamplingParams
from nanokv.sequence import Request
from nanokv.stopping import StopChecker
from nanokv.tokenizer import Tokenizer

if TYPE_CHECKING:
    from nanokv.llm import LLM

SETTINGS = ("question", "context")


@dataclass(frozen=True)
class Prompt:
    setting: str  # "question" or "context"
    prefill: list[int]  # token ids prefilled and compressed
    follow: list[int]  # context-only: ids fed after compression (question, template tail, prefix)

    @property
    def tokens(self) -> int:
        return len(self.prefill) + len(self.follow)


@dataclass(frozen=True)
class Outcome:
    text: str
    kept_tokens: float  # tokens a (layer, kv head) held after compression, on average
    tracked_kept: list[float] | None  # per layer: share of the tracked positions still held
    seconds: float


def build_prompt(
    tokenizer: Tokenizer, setting: str, document: str, question: str, answer_prefix: str
) -> Prompt:
    """The token ids of `document` + `question` in `setting`, with the answer primed. Without a
    chat template the texts are concatenated raw and the prefix starts a new line."""
    chat = tokenizer.chat_template is not None
    prefix = answer_prefix if chat else "\n" + answer_prefix
    if setting == "question":
        if chat:
            ids = tokenizer.encode_chat([{"role": "user", "content": document + question}])
            ids = ids + tokenizer.encode(prefix, add_special_tokens=False)
        else:
            ids = tokenizer.encode(document + question + prefix)
        return Prompt(setting, ids, [])
    if setting == "context":
        if not question.strip():
            raise ValueError("the question is empty: give the text to ask")
        ids, suffix = split_context(tokenizer, document, chat)
        follow = tokenizer.encode(question + suffix + prefix, add_special_tokens=False)
        return Prompt(setting, ids, follow)  # as CompressedContext.question_ids builds it
    raise ValueError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")


def answer(
    llm: LLM,
    engine: Engine,
    prompt: Prompt,
    params: SamplingParams,
    track: list[int] | None = None,
    stopper: StopChecker | None = None,
    record: PromptRecord | None = None,
) -> Outcome:
    """Runs `prompt` with `engine` (its policy and budget) as a request through `llm`'s
    scheduler and returns the answer text, with what compression kept of the `track`ed prompt
    positions (e.g. the needle's tokens). `stopper` replaces the usual EOS / stop-string check;
    `record` (Engine.record_prompt of `prompt.prefill`) replaces its forward pass."""
    began = time.perf_counter()
    if prompt.follow:
        reserve = len(prompt.follow) + params.max_new_tokens
        state = compress(engine, llm.tokenizer, prompt, reserve, record)
        kept, tracked = _kept(state, track)
        text = ask(llm, engine, state, prompt, params, stopper)
        return Outcome(text, kept, tracked, time.perf_counter() - began)
    compressed: list[tuple[float, list[float] | None]] = []
    request = Request(
        prompt.prefill, params, engine=engine, record=record, stopper=stopper,
        on_prefilled=lambda state: compressed.append(_kept(state, track)),
    )  # fmt: skip
    (result,) = llm.run_requests([request])
    kept, tracked = compressed[0]
    return Outcome(result.text, kept, tracked, time.perf_counter() - began)


def compress(
    engine: Engine,
    tokenizer: Tokenizer,
    prompt: Prompt,
    reserve: int,
    record: PromptRecord | None = None,
) -> DecodeState:
    """Context-only: prefills and compresses `prompt.prefill` (the document) once, as
    `LLM.compress` does, with `reserve` slots kept free so that nothing is evicted while a
    question and its answer (at most `reserve` tokens together) run; `record` (of the prefill)
    replaces its forward pass. Ask it with `ask`, as many questions as needed."""
    records = None if record is None else [record]
    probes = None if record is not None else engine.probes(tokenizer, [prompt.prefill])
    state, _ = engine.start(
        [prompt.prefill], reserve, decode_window=reserve, records=records, probes=probes
    )
    return state


def ask(
    llm: LLM,
    engine: Engine,
    compressed: DecodeState,
    prompt: Prompt,
    params: SamplingParams,
    stopper: StopChecker | None = None,
) -> str:
    """Context-only: the answer to `prompt.follow` (question, template tail, answer prefix)
    from a copy of the `compressed` document, as a request through `llm`'s scheduler (what
    `LLM.chat(..., context=)` does); the compressed state is left as it was for the next
    question."""
    request = Request(prompt.follow, params, context=compressed, engine=engine, stopper=stopper)
    (result,) = llm.run_requests([request])
    return result.text


def _kept(state: DecodeState, track: list[int] | None) -> tuple[float, list[float] | None]:
    """What compression kept: slots a head on average, and the `track`ed positions' shares."""
    return kept_tokens(state), None if track is None else kept_share(state, track)


def kept_tokens(state: DecodeState) -> float:
    """Slots a (layer, kv head) of sequence 0 holds, on average."""
    return float(state.arena.lengths[:, 0].float().mean())


def probe_for(engine: Engine, tokenizer: Tokenizer, prompt: Prompt) -> Probe:
    """KVzip's probe of the prompt's prefilled part, as `LLM` builds it (recorded once for
    every policy of a grid, whichever observes)."""
    return engine.probe(tokenizer, prompt.prefill)


def kept_share(state: DecodeState, positions: list[int]) -> list[float]:
    """Per layer, the share of `positions` that the arena of sequence 0 holds, averaged over
    the kv heads (eviction is per kv head)."""
    arena, wanted = state.arena, torch.tensor(positions, dtype=torch.int32)
    shares = []
    for layer in range(arena.lengths.shape[0]):
        per_head = []
        for head in range(arena.lengths.shape[2]):
            held = arena.pos[layer, 0, head, : int(arena.lengths[layer, 0, head])].cpu()
            per_head.append(float(torch.isin(wanted, held).float().mean()))
        shares.append(sum(per_head) / len(per_head))
    return shares
