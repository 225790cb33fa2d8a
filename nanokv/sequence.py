"""A request as the scheduler sees it: its prompt, sampling, KV settings, and what it has produced.

One `Request` is what a client asks for (the server, `LLM`, a benchmark); the scheduler turns it
into a `RunningRequest` that owns the request's engine state and pool pages while it runs, and
reports its progress as `RequestEvent`s.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nanokv.sampling import SamplingParams

if TYPE_CHECKING:
    import torch

    from nanokv.engine import DecodeState, Engine, PromptRecord, Sequence
    from nanokv.report import CacheReport
    from nanokv.sampling import Sampler
    from nanokv.stopping import StopChecker

_ids = itertools.count(1)


@dataclass
class Request:
    """What a client asks for. `policy` / `budget` None take the scheduler's defaults; a budget
    is a fraction of the prompt in (0, 1] or a token count > 1 (as `--budget`)."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    policy: str | None = None
    budget: float | None = None
    request_id: int = field(default_factory=lambda: next(_ids))
    report: bool = False  # the last event carries a CacheReport of what the request kept
    # library use: continue a compressed context (`LLM.compress`) with the engine that made it;
    # `prompt_ids` are then the tokens after it (a question), fed to a copy of the state
    context: DecodeState | None = None
    engine: Engine | None = None
    # library use (the eval, benchmarks): a recorded pass of `prompt_ids` that replaces their
    # forward pass (`Engine.record_prompt`), a stop rule of its own instead of EOS and
    # `params.stop`, and a look at the state after prefill and compression, before the first
    # token is sampled (which prompt tokens were kept)
    record: PromptRecord | None = None
    stopper: StopChecker | None = None
    on_prefilled: Callable[[DecodeState], None] | None = None


@dataclass(frozen=True)
class RequestEvent:
    """Progress of one request, reported from the scheduler's thread: new text (possibly
    empty), and on the last event why it finished ("stop", "length", "cancelled", "error")."""

    request_id: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    report: CacheReport | None = None  # on the last event, when the request asked for one

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


EventCallback = Callable[[RequestEvent], None]


@dataclass
class RunningRequest:
    """A request admitted by the scheduler: its engine (policy and budget), pool pages, and
    either its prefill in progress or its decode state."""

    request: Request
    on_event: EventCallback
    engine: Engine
    peak: tuple[int, int]  # (pages, bytes) of its arena at its largest: during prefill
    steady: tuple[int, int]  # (pages, bytes) planned while it decodes: what admission reserves
    prefill: Generator[None, None, tuple[DecodeState, torch.Tensor]] | None = None
    state: DecodeState | None = None
    next_token: int | None = None  # sampled and recorded, fed at the next decode step
    sequence: Sequence | None = None
    sampler: Sampler | None = None
    stopper: StopChecker | None = None
    prefill_seconds: float = 0.0  # spent in its own prefill steps
    report: CacheReport | None = None

    @property
    def request_id(self) -> int:
        return self.request.request_id

    @property
    def generated(self) -> int:
        return 0 if self.sequence is None else len(self.sequence.token_ids)
