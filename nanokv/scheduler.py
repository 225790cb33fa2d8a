"""The scheduler: a waiting queue, admission against the KV pool, chunked prefill between decode
steps, and continuous batching of every running request.

Each `step` does, in order: drop cancelled requests (their pages go back to the pool at once);
admit waiting requests, first come first served, while the pool holds their decode-time pages;
start the next admitted prompt's prefill when none runs (its pages grow to the prefill's peak
for as long as it lasts); run query chunks (`prefill_chunk` rows of one layer each) of the
prefills for the step's prefill allowance (at least one chunk: `prefill_share` of the time
while a batch decodes, so a long prompt never stalls streaming for long and a queue of them
still reaches the batch); and one decode step of every running request together.
A request leaves the batch at EOS, a stop string, `max_new_tokens`, cancellation or an error,
and every one of those returns its pages.

Clients call `submit` and `cancel` from any thread; `run` (or `start`, on a thread of its own)
drives the steps. Requests report through `RequestEvent`s on the scheduler's thread.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass

import torch

from nanokv.arena import KVArena
from nanokv.budget import Budget
from nanokv.engine import DecodeState, Engine, InputError, Sequence
from nanokv.policies import make_policy, parse_policy
from nanokv.pool import PAGE_SIZE, KVPool, PoolFullError, pages_for
from nanokv.runner import Member, decode_step
from nanokv.sampling import Sampler
from nanokv.sequence import EventCallback, Request, RequestEvent, RunningRequest
from nanokv.stopping import StopChecker

MAX_ENGINES = 16  # (policy, budget) engines kept for per-request KV settings
PREFILL_SHARE = 0.5  # of the scheduler's time, for prefills, while a batch decodes


def prefill_allowance(share: float, decode_seconds: float) -> float:
    """Seconds of prefill chunks a step may run before its decode step, so that prefill takes
    `share` of the time while a batch decodes (`decode_seconds`: its last step's time); a
    step always runs at least one chunk."""
    return share / (1.0 - share) * decode_seconds


class QueueFullError(RuntimeError):
    """The waiting queue is full: retry later (HTTP 503 with Retry-After)."""


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for `/stats`: what runs, what waits, how full the pool is."""

    running: int
    prefilling: int
    admitted: int  # holding their decode-time pages, waiting for their prefill
    waiting: int  # holding nothing yet
    pool_bytes: int
    pool_used_bytes: int
    pool_used_pages: int
    finished: int
    generated_tokens: int
    peak_admitted: int  # the most requests holding pool pages at once (since `reset_peaks`)
    peak_running: int
    pool_peak_bytes: int

    def as_dict(self) -> dict[str, int | float]:
        fields = dict(self.__dict__)
        fields["pool_use"] = self.pool_used_bytes / self.pool_bytes
        fields["pool_peak_use"] = self.pool_peak_bytes / self.pool_bytes
        return fields


class Scheduler:
    """Runs requests on one loaded model (`nanokv.LLM`) within one KV pool."""

    def __init__(
        self, llm, pool: KVPool, *, max_waiting: int = 64, prefill_share: float = PREFILL_SHARE
    ) -> None:
        """`llm` gives the model, tokenizer, default policy and budget (its engine);
        `max_waiting` bounds the waiting queue (QueueFullError past it). `prefill_share` in
        [0, 1) is the share of time prefills get while a batch decodes: higher brings queued
        prompts into the batch sooner (throughput, time to first token), lower keeps the
        running streams' inter-token latency closer to one decode step; 0 runs one chunk a
        step."""
        if not 0.0 <= prefill_share < 1.0:
            raise ValueError(f"prefill_share must be in [0, 1), got {prefill_share}")
        self.llm, self.pool, self.max_waiting = llm, pool, max_waiting
        self.prefill_share = prefill_share
        self.decode_seconds = 0.0  # the last decode step's time: what the allowance scales
        self._engines: dict[tuple[str, float], Engine] = {}
        self._waiting: deque[RunningRequest] = deque()  # no memory yet
        self._admitted: deque[RunningRequest] = deque()  # their decode-time pages, prefill next
        self._prefilling: list[RunningRequest] = []  # at most one, holding its arena's peak
        self._running: list[RunningRequest] = []
        self._cancelled: set[int] = set()
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = self._generated = self._peak = self._peak_running = 0

    # --- the client side: any thread ------------------------------------------------------

    def submit(self, request: Request, on_event: EventCallback) -> int:
        """Queues a request; returns its id. InputError for a request that is invalid or can
        never fit the pool; QueueFullError when the waiting queue is full."""
        engine = request.engine or self.engine_for(request.policy, request.budget)
        if not request.prompt_ids:
            raise InputError("the prompt is empty: give at least one token of text")
        if request.context is None:
            engine.check_prompts([request.prompt_ids], request.params.max_new_tokens)
        peak, steady = self.reservation(request, engine)
        if peak[1] > self.pool.capacity_bytes:
            raise InputError(
                f"this request's KV cache needs {peak[1] / 2**20:.1f} MiB but the server's whole "
                f"pool is {self.pool.capacity_bytes / 2**20:.1f} MiB: lower max_tokens, the "
                "prompt or kv_budget"
            )
        running = RunningRequest(request, on_event, engine, peak, steady)
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting: retry later")
            self._waiting.append(running)
            self._wake.notify()
        return request.request_id

    def cancel(self, request_id: int) -> None:
        """Stops a request wherever it is; its pages return within one step."""
        with self._wake:
            self._cancelled.add(request_id)
            self._wake.notify()

    def stats(self) -> SchedulerStats:
        with self._wake:
            counts = len(self._running), len(self._prefilling), len(self._admitted)
            counts += (len(self._waiting),)
        return SchedulerStats(
            *counts, self.pool.capacity_bytes, self.pool.used_bytes, self.pool.used_pages,
            self._finished, self._generated, self._peak, self._peak_running,
            self.pool.peak_bytes,
        )  # fmt: skip

    def reset_peaks(self) -> None:
        """Starts the peaks of `stats` afresh (a benchmark measures one load at a time)."""
        with self._wake:
            self._peak = len(self._admitted) + len(self._prefilling) + len(self._running)
            self._peak_running = len(self._running)
        self.pool.reset_peak()

    def admitted(self) -> list[RunningRequest]:
        """The requests that hold pool pages now: admitted, prefilling or running."""
        with self._wake:
            return [*self._admitted, *self._prefilling, *self._running]

    def engine_for(self, policy: str | None, budget: float | None) -> Engine:
        """The engine of a request's policy and budget (None: the server's own); ValueError for
        an unknown policy or an invalid budget. A request naming the server's policy gets the
        server's options for it (sinks, window, allocation...); another policy its defaults.
        The last MAX_ENGINES engines are kept: building one is cheap, the model is shared."""
        llm = self.llm
        name = policy if policy is not None else llm.policy.name
        value = budget if budget is not None else llm.budget.value
        key = (name, float(value))
        with self._wake:
            engine = self._engines.pop(key, None)
        if engine is None:
            engine = self._new_engine(name, value)
        with self._wake:
            self._engines[key] = engine  # most recently used last
            while len(self._engines) > MAX_ENGINES:
                self._engines.pop(next(iter(self._engines)))
        return engine

    def _new_engine(self, name: str, value: float) -> Engine:
        llm = self.llm
        base, uses_quest = parse_policy(name)
        if uses_quest:
            raise ValueError("kv_policy 'quest' is not served: choose an eviction policy")
        if base == llm.policy.name:
            policy = make_policy(base, **dataclasses.asdict(llm.policy.options))
        else:
            policy = make_policy(base)
        own = base == llm.policy.name and llm.budget.value == value
        budget = llm.budget if own else Budget(value, floor=llm.budget.floor)
        return Engine(
            llm.model, llm.config, policy, budget=budget, quest=llm.quest if own else None,
            prefill_chunk=llm.prefill_chunk,
        )  # fmt: skip

    # --- the scheduler's thread -----------------------------------------------------------

    def start(self) -> threading.Thread:
        """Runs the steps on a daemon thread until `stop`."""
        self._thread = threading.Thread(target=self.run, name="nanokv-scheduler", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def run(self) -> None:
        """Steps while there is work; sleeps until a submit or cancel otherwise."""
        while not self._stop.is_set():
            try:
                worked = self.step()
            except Exception as exc:  # noqa: BLE001 - never leave requests hanging on a dead loop
                self._fail_all(exc)
                worked = True
            if not worked:
                with self._wake:
                    if not (self._waiting or self._cancelled or self._stop.is_set()):
                        self._wake.wait(timeout=0.5)

    def _fail_all(self, exc: BaseException) -> None:
        for item in [*self._admitted, *self._prefilling, *self._running]:
            self._fail(item, exc)

    def idle(self) -> bool:
        with self._wake:
            busy = self._waiting or self._admitted or self._prefilling or self._running
            return not (busy or self._cancelled)

    def step(self) -> bool:
        """One scheduling step; False when there was nothing to do."""
        self._drop_cancelled()
        worked = self._prefill_for(prefill_allowance(self.prefill_share, self.decode_seconds))
        if self._running:
            began = time.perf_counter()
            self._decode()
            self.decode_seconds = time.perf_counter() - began
            worked = True
        return worked

    def _prefill_for(self, seconds: float) -> bool:
        """Admits and prefills, one chunk at a time, until `seconds` have passed (at least one
        chunk; with nothing decoding, one chunk a step); False when there was nothing to do."""
        began, worked = time.perf_counter(), False
        while True:
            if self._next_prefill():
                self._admit()
                self._next_prefill()
            if not self._prefill_one_chunk():
                return worked
            worked = True
            if not self._running or time.perf_counter() - began >= seconds:
                return worked

    def _drop_cancelled(self) -> None:
        with self._wake:
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [r for r in self._waiting if r.request_id in cancelled]
            for item in waiting:
                self._waiting.remove(item)
        for item in waiting:
            self._end(item, "cancelled")
        for group in (self._admitted, self._prefilling, self._running):
            for item in [r for r in group if r.request_id in cancelled]:
                group.remove(item)
                self._end(item, "cancelled")

    def _admit(self) -> None:
        """Admits waiting requests, first come first served, while the pool holds their
        decode-time pages (the prompt's budget plus the decode window): that is what each
        will hold while it runs, so it is what bounds how many run at once."""
        while True:
            with self._wake:
                if not self._waiting:
                    return
                head = self._waiting[0]
                try:
                    self.pool.reserve(head.request_id, *head.steady)
                except PoolFullError:
                    return  # the head waits for pages; nobody overtakes it
                self._waiting.popleft()
                self._admitted.append(head)
                self._note_admitted()

    def _next_prefill(self) -> bool:
        """Starts the next admitted prompt's prefill when none is in progress: its pages grow to
        the arena's peak (prefill holds every layer's candidates before the selection), and
        shrink back after it. False when that growth must wait for memory: admitting more
        would take what it waits for. With nothing running to free memory, the latest admitted
        request goes back to the front of the queue (preempted before it held any K/V)."""
        if self._prefilling or not self._admitted:
            return True
        head = self._admitted[0]
        try:
            self.pool.resize(head.request_id, *head.peak)
        except PoolFullError:
            if not self._running and len(self._admitted) > 1:
                latest = self._admitted.pop()
                self.pool.release(latest.request_id)
                with self._wake:
                    self._waiting.appendleft(latest)
            return False
        self._admitted.popleft()
        try:
            self._start_prefill(head)
        except Exception as exc:  # noqa: BLE001 - fail the request, keep serving
            self._fail(head, exc)
        return True

    def _note_admitted(self) -> None:
        held = len(self._admitted) + len(self._prefilling) + len(self._running)
        self._peak = max(self._peak, held)

    def _start_prefill(self, item: RunningRequest) -> None:
        request, engine = item.request, item.engine
        if request.context is not None:
            item.prefill = _extend_steps(engine, request.context, request.prompt_ids)
        elif request.record is not None:
            item.prefill = _recorded_steps(engine, request)
        else:
            probes = engine.probes(self.llm.tokenizer, [request.prompt_ids])
            item.prefill = engine.start_steps(
                [request.prompt_ids], request.params.max_new_tokens, probes=probes
            )
        self._prefilling.append(item)

    def _prefill_one_chunk(self) -> bool:
        if not self._prefilling:
            return False
        item = self._prefilling[0]
        began = time.perf_counter()
        try:
            next(item.prefill)
            item.prefill_seconds += time.perf_counter() - began
            return True
        except StopIteration as done:
            item.prefill_seconds += time.perf_counter() - began
            result = done.value
        except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the rest
            self._fail(item, exc)
            return True
        self._prefilling.remove(item)
        item.prefill = None
        try:
            item.state, logits = result
            self._begin_decode(item, logits)
        except Exception as exc:  # noqa: BLE001
            self._fail(item, exc)
        return True

    def _fail(self, item: RunningRequest, exc: BaseException) -> None:
        """Ends a request with an error wherever it is; its pages return to the pool."""
        for group in (self._admitted, self._prefilling, self._running):
            if item in group:
                group.remove(item)
        self._end(item, "error", error=_one_line(exc))

    def _begin_decode(self, item: RunningRequest, logits: torch.Tensor) -> None:
        """After prefill: trim the pool pages to the shrunk arena, sample the first token."""
        request, engine = item.request, item.engine
        item.state.prefill_seconds = item.prefill_seconds
        new_tokens = request.params.max_new_tokens
        self.pool.resize(item.request_id, *self._held(engine, item.state.arena, new_tokens))
        item.sequence = Sequence(list(request.prompt_ids))
        item.sampler = Sampler(request.params, 1, engine.device)
        params = request.params
        item.stopper = request.stopper or StopChecker(
            self.llm.tokenizer.decode, self.llm.eos_token_ids, params.stop, params.ignore_eos
        )
        if request.on_prefilled is not None:
            request.on_prefilled(item.state)
        self._running.append(item)
        self._peak_running = max(self._peak_running, len(self._running))
        self._advance(item, logits)

    def _decode(self) -> None:
        """Feeds every running request its last sampled token in one batched step, then
        samples and records each one's next token."""
        batch = list(self._running)
        tokens = torch.tensor([item.next_token for item in batch], device=self.llm.device)
        try:
            logits = decode_step(self.llm.model, [Member(i.engine, i.state) for i in batch], tokens)
        except Exception as exc:  # noqa: BLE001 - report it to every member, keep serving
            for item in batch:
                self._fail(item, exc)
            return
        for row, item in enumerate(batch):
            try:
                self._advance(item, logits[row : row + 1])
            except Exception as exc:  # noqa: BLE001 - e.g. sampling from non-finite logits
                self._fail(item, exc)

    def _advance(self, item: RunningRequest, logits: torch.Tensor) -> None:
        """Samples a request's next token from logits (1, vocab), records it, and finishes the
        request when it stops; otherwise the token is fed at the next decode step."""
        token = int(item.sampler(logits)[0])
        last = item.generated + 1 >= item.request.params.max_new_tokens
        delta = item.stopper.advance(item.sequence, token, last)
        self._generated += 1
        reason = item.sequence.finish_reason
        if reason is not None:
            self._running.remove(item)
            self._end(item, reason, text=delta, tokens=(token,))
            return
        item.next_token = token
        self._notify(item, self._event(item, delta, (token,), None))

    def _end(
        self,
        item: RunningRequest,
        reason: str,
        text: str = "",
        tokens: tuple[int, ...] = (),
        error: str | None = None,
    ) -> None:
        """Returns the request's pages and state (if it holds any), then reports its last
        event."""
        request = item.request
        if request.report and item.state is not None:
            item.report = item.engine.report(
                item.state, [request.prompt_ids], request.params.max_new_tokens
            )
        self.pool.release(item.request_id)
        item.state = item.prefill = None
        self._finished += 1
        self._notify(item, self._event(item, text, tokens, reason, error))

    def _notify(self, item: RunningRequest, event: RequestEvent) -> None:
        """Delivers an event; a client whose callback fails cannot hear more, so its request
        is cancelled (at the next step) instead of taking the scheduler's thread down."""
        try:
            item.on_event(event)
        except Exception:  # noqa: BLE001
            if not event.finished:
                self.cancel(item.request_id)

    @staticmethod
    def _event(
        item: RunningRequest,
        text: str,
        tokens: tuple[int, ...],
        reason: str | None,
        error: str | None = None,
    ) -> RequestEvent:
        prompt = len(item.request.prompt_ids)
        report = item.report if reason is not None else None
        return RequestEvent(
            item.request_id, text, tokens, reason, prompt, item.generated, error, report
        )

    def reservation(
        self, request: Request, engine: Engine | None = None
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """(pages, bytes) a request holds at its peak (its prefill) and while it decodes (what
        admission reserves): how many such requests the pool runs at once is the pool's bytes
        over the second."""
        engine = engine or request.engine or self.engine_for(request.policy, request.budget)
        if request.context is not None:
            pages = self._context_pages(engine, request)
            return pages, pages
        ids, new_tokens = request.prompt_ids, request.params.max_new_tokens
        peak = self._pages(engine, engine.arena_capacity([ids], new_tokens), new_tokens)
        return peak, self._pages(engine, engine.decode_capacities(ids, new_tokens), new_tokens)

    def _context_pages(self, engine: Engine, request: Request) -> tuple[int, int]:
        """(pages, bytes) of a context request's copy of the compressed arena (it does not
        grow: compress reserved room for the question and the answer)."""
        return self._held(engine, request.context.arena, request.params.max_new_tokens)

    @staticmethod
    def _held(engine: Engine, arena: KVArena, new_tokens: int) -> tuple[int, int]:
        """(pages, bytes) an arena holds as it is (each head's own slots where its layer is
        packed), plus the queries a decode of `new_tokens` keeps for deferred statistics."""
        return arena.page_count, arena.nbytes + engine.deferred_bytes(new_tokens)

    def _pages(self, engine: Engine, capacity: int | list[int], new_tokens: int) -> tuple[int, int]:
        """(pages, bytes) of a one-sequence arena of `capacity` slots a head (or per layer), in
        whole pages; the bytes also count the queries a decode of `new_tokens` keeps for the
        policy's deferred statistics (`Engine.deferred_bytes`)."""
        cfg = self.llm.config
        layers = [capacity] * cfg.num_layers if isinstance(capacity, int) else capacity
        paged = [-(-slots // PAGE_SIZE) * PAGE_SIZE for slots in layers]
        pages = sum(pages_for(1, cfg.num_kv_heads, slots) for slots in paged)
        return pages, engine.arena_bytes(paged) + engine.deferred_bytes(new_tokens)


def _extend_steps(
    engine: Engine, context: DecodeState, ids: list[int]
) -> Generator[None, None, tuple[DecodeState, torch.Tensor]]:
    """A context request's "prefill": a copy of the compressed state, then the question
    written into it (`Engine.extend`), as two steps."""
    state = context.clone()
    yield
    return state, engine.extend(state, ids)


def _recorded_steps(
    engine: Engine, request: Request
) -> Generator[None, None, tuple[DecodeState, torch.Tensor]]:
    """A request's prefill from its recorded pass (`Engine.start` with `records`): no forward
    pass, so one step."""
    yield
    ids, new_tokens = request.prompt_ids, request.params.max_new_tokens
    return engine.start([ids], new_tokens, records=[request.record])


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
