"""The scheduler on a tiny model: continuous batching gives the texts sequential generation gives,
prefill runs a layer at a time between decode steps, admission follows the pool, and every way a
request ends returns its pages."""

from __future__ import annotations

import time

import pytest
import torch

from nanokv import LLM
from nanokv.budget import Budget
from nanokv.engine import Engine, InputError
from nanokv.policies import make_policy
from nanokv.pool import KVPool
from nanokv.runner import Member, decode_step
from nanokv.sampling import SamplingParams
from nanokv.scheduler import QueueFullError, Scheduler, prefill_allowance
from nanokv.sequence import Request
from nanokv.stopping import StopChecker

MIN_CACHE = 8


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, dtype="float32", min_cache=MIN_CACHE)


class Recorder:
    """Collects every request's events, in order."""

    def __init__(self) -> None:
        self.events: dict[int, list] = {}

    def __call__(self, event) -> None:
        self.events.setdefault(event.request_id, []).append(event)

    def tokens(self, request_id: int) -> list[int]:
        return [t for e in self.events[request_id] for t in e.token_ids]

    def text(self, request_id: int) -> str:
        return "".join(e.text for e in self.events[request_id])

    def last(self, request_id: int):
        return self.events[request_id][-1]


def drain(scheduler: Scheduler, limit: int = 10_000) -> int:
    steps = 0
    while not scheduler.idle():
        scheduler.step()
        steps += 1
        assert steps < limit
    return steps


def prompts(llm: LLM, count: int) -> list[list[int]]:
    words = ["red", "blue", "green", "apple", "stone", "river", "cloud", "seven"]
    return [
        llm.tokenizer.encode(" ".join(words[(i + j) % 8] for j in range(10 + 7 * i)))
        for i in range(count)
    ]


@pytest.mark.parametrize(
    ("policy", "budget"),
    [(None, None), ("snapkv", 0.5), ("laprox", 0.3), ("h2o", 12), ("auv", 0.4)],
)
def test_a_continuous_batch_generates_what_each_prompt_generates_alone(llm, policy, budget):
    scheduler = Scheduler(llm, KVPool(2**24))
    recorder = Recorder()
    params = SamplingParams(max_new_tokens=14, ignore_eos=True)
    ids = prompts(llm, 6)
    submitted = [
        scheduler.submit(Request(p, params, policy=policy, budget=budget), recorder) for p in ids
    ]
    drain(scheduler)
    alone = LLM(
        llm.model_dir,
        dtype="float32",
        min_cache=MIN_CACHE,
        policy=policy or "full",
        budget=1.0 if budget is None else budget,
    )
    for request_id, prompt in zip(submitted, ids, strict=True):
        (expected,) = alone.engine.generate([prompt], params, alone._stopper(params))
        assert recorder.tokens(request_id) == expected.token_ids
        assert recorder.text(request_id) == expected.text
        assert recorder.last(request_id).finish_reason == "length"
    assert scheduler.stats().peak_admitted > 1
    assert scheduler.pool.used_bytes == 0


def test_one_member_decode_step_is_engine_step(llm):
    prompt = prompts(llm, 1)[0]
    engine = llm.engine
    state_a, logits_a = engine.start([prompt], 8)
    state_b, _ = engine.start([prompt], 8)
    token = logits_a.argmax(-1)
    direct = engine.step(state_a, token)
    batched = decode_step(llm.model, [Member(engine, state_b)], token)
    assert torch.equal(direct, batched)


def test_prefill_runs_a_layer_per_step_while_the_batch_decodes(llm):
    scheduler = Scheduler(llm, KVPool(2**24), prefill_share=0.0)  # one chunk a step
    recorder = Recorder()
    short, long = prompts(llm, 3)[0], prompts(llm, 3)[-1]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    first = scheduler.submit(Request(short, params), recorder)
    while scheduler.stats().running == 0:
        scheduler.step()
    second = scheduler.submit(Request(long, params), recorder)
    before = len(recorder.tokens(first))
    layers = llm.config.num_layers
    for _ in range(layers):  # the long prompt's prefill: one layer a step
        scheduler.step()
        assert scheduler.stats().prefilling == 1
    assert len(recorder.tokens(first)) == before + layers  # the batch kept decoding
    scheduler.step()
    assert scheduler.stats().prefilling == 0 and second in recorder.events


def test_admission_waits_for_pages_and_refuses_what_never_fits(llm):
    engine = llm.engine
    ids = [prompts(llm, 3)[2]] * 3
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    one = engine.arena_bytes(-(-engine.arena_capacity([ids[2]], 10) // 16) * 16)
    scheduler = Scheduler(llm, KVPool(one + one // 2))  # holds one request at a time
    recorder = Recorder()
    submitted = [scheduler.submit(Request(p, params), recorder) for p in ids]
    peak = 0
    while not scheduler.idle():
        scheduler.step()
        stats = scheduler.stats()
        peak = max(peak, stats.running + stats.prefilling)
        assert stats.pool_used_bytes <= stats.pool_bytes
    assert peak == 1
    assert all(recorder.last(r).finish_reason == "length" for r in submitted)
    with pytest.raises(InputError, match="whole pool"):
        scheduler.submit(Request(ids[2], SamplingParams(max_new_tokens=120)), recorder)


def test_bad_requests_are_refused_at_submit(llm):
    scheduler = Scheduler(llm, KVPool(2**24), max_waiting=2)
    recorder = Recorder()
    context = llm.config.max_position_embeddings
    with pytest.raises(InputError, match="context"):
        scheduler.submit(Request([5] * context, SamplingParams(max_new_tokens=4)), recorder)
    with pytest.raises(InputError, match="empty"):
        scheduler.submit(Request([], SamplingParams(max_new_tokens=4)), recorder)
    with pytest.raises(ValueError, match="unknown policy"):
        scheduler.submit(Request([5, 6], policy="lru"), recorder)
    with pytest.raises(ValueError, match="budget"):
        scheduler.submit(Request([5, 6], budget=-1), recorder)
    for _ in range(2):
        scheduler.submit(Request([5, 6], SamplingParams(max_new_tokens=2)), recorder)
    with pytest.raises(QueueFullError):
        scheduler.submit(Request([5, 6], SamplingParams(max_new_tokens=2)), recorder)
    drain(scheduler)
    assert scheduler.pool.used_bytes == 0


def test_cancel_returns_pages_within_one_step_wherever_the_request_is(llm):
    scheduler = Scheduler(llm, KVPool(2**24))
    recorder = Recorder()
    params = SamplingParams(max_new_tokens=50, ignore_eos=True)
    running, prefilling, admitted = (
        scheduler.submit(Request(p, params), recorder) for p in prompts(llm, 3)
    )
    while scheduler.stats().running == 0:
        scheduler.step()
    scheduler.step()
    stats = scheduler.stats()
    assert (stats.running, stats.prefilling, stats.admitted) == (1, 1, 1)
    for request_id in (running, prefilling, admitted):
        scheduler.cancel(request_id)
    scheduler.step()
    assert scheduler.idle() and scheduler.pool.used_bytes == 0
    for request_id in (running, prefilling, admitted):
        assert recorder.last(request_id).finish_reason == "cancelled"


def test_stop_strings_and_eos_end_a_request_like_generate(llm):
    scheduler = Scheduler(llm, KVPool(2**24))
    recorder = Recorder()
    prompt = prompts(llm, 4)[3]
    unstopped = SamplingParams(max_new_tokens=20, ignore_eos=True)
    (free,) = llm.engine.generate([prompt], unstopped, llm._stopper(unstopped))
    stop = free.text[len(free.text) // 2 :][:2]
    params = SamplingParams(max_new_tokens=20, stop=[stop])
    (expected,) = llm.engine.generate([prompt], params, llm._stopper(params))
    request_id = scheduler.submit(Request(prompt, params), recorder)
    drain(scheduler)
    assert recorder.text(request_id) == expected.text
    assert recorder.last(request_id).finish_reason == expected.finish_reason == "stop"


@pytest.mark.parametrize("allocation", ["pyramid", "global"])
def test_layer_capacities_hold_each_layer_at_its_own_size(llm, allocation):
    """The server's engines give each layer its own capacity after prefill: a selection that
    keeps different counts in different layers then costs its layers' sizes, not the largest
    head's in every layer, and decodes the same tokens as the stacked arena."""
    prompt = prompts(llm, 3)[2]
    policy = make_policy("snapkv", allocation=allocation, max_head_share=8, observation_window=8)
    budget = Budget(0.3, floor=MIN_CACHE)
    engines = [
        Engine(llm.model, llm.config, policy, budget=budget, layer_capacities=ragged)
        for ragged in (True, False)
    ]
    (ragged, _), (stacked, _) = (engine.start([prompt], 12) for engine in engines)
    capacities = [ragged.arena.layer_capacity(layer) for layer in range(llm.config.num_layers)]
    assert torch.equal(ragged.arena.lengths, stacked.arena.lengths)
    assert max(capacities) == stacked.arena.capacity
    if allocation == "pyramid":  # the pyramid's layers keep different counts by construction
        assert ragged.arena.per_layer and ragged.arena.nbytes < stacked.arena.nbytes
    tokens = torch.tensor([7])
    for _ in range(12):  # past a decode-window eviction
        got = [
            engine.step(state, tokens)
            for engine, state in zip(engines, (ragged, stacked), strict=True)
        ]
        torch.testing.assert_close(got[0], got[1], atol=1e-5, rtol=1e-5)
        tokens = got[1].argmax(-1)
    assert torch.equal(ragged.arena.lengths, stacked.arena.lengths)


def test_a_request_with_pages_per_head_holds_its_arena_in_the_pool(llm):
    """A global selection keeps different counts in a layer's heads: after prefill the request
    holds what its packed arena holds (each head its own slots), less than a rectangle a layer,
    and gives it all back when it finishes."""
    scheduler = Scheduler(llm, KVPool(2**26))
    ids = prompts(llm, 12)[11][:200]
    seen = {}

    def look(state) -> None:
        seen["arena"], seen["held"] = state.arena, scheduler.pool.holders()

    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    request = Request(ids, params, policy="laprox", budget=0.2, on_prefilled=look)
    request_id = scheduler.submit(request, Recorder())
    drain(scheduler)
    arena, engine = seen["arena"], scheduler.engine_for("laprox", 0.2)
    layers = range(llm.config.num_layers)
    assert any(arena.pages(layer) is not None for layer in layers)
    pages, nbytes = seen["held"][request_id]
    assert (pages, nbytes) == (arena.page_count, arena.nbytes + engine.deferred_bytes(6))
    assert arena.nbytes < engine.arena_bytes([arena.layer_capacity(layer) for layer in layers])
    assert scheduler.pool.used_bytes == 0


def test_a_failing_client_is_dropped_and_the_scheduler_keeps_serving(llm):
    """A client whose callback raises cannot hear more: its request is cancelled and its pages
    return; the scheduler's thread lives on and serves the next request."""
    scheduler = Scheduler(llm, KVPool(2**24))
    scheduler.start()
    try:

        def broken(event):
            raise RuntimeError("the client went away")

        params = SamplingParams(max_new_tokens=30, ignore_eos=True)
        prompt = prompts(llm, 1)[0]
        scheduler.submit(Request(prompt, params), broken)
        recorder = Recorder()
        request_id = scheduler.submit(Request(prompt, params), recorder)
        deadline = time.monotonic() + 60
        while not (request_id in recorder.events and recorder.last(request_id).finished):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        while not scheduler.idle():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert recorder.last(request_id).finish_reason == "length"
        assert scheduler.pool.used_bytes == 0 and scheduler.stats().generated_tokens < 60
    finally:
        scheduler.stop()


def test_admission_counts_decode_time_pages_and_preempts_when_a_prefill_cannot_grow(llm):
    """Admission reserves what a request holds while it decodes (its budget plus W); the one
    prefill in progress grows to its peak. When that growth cannot fit and nothing runs to free
    memory, the latest admitted request goes back to the queue, and every request still ends
    with the tokens it would generate alone."""
    prompt = prompts(llm, 3)[2]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    probe = Request(prompt, params, policy="laprox", budget=0.25)
    (_, peak), (_, steady) = Scheduler(llm, KVPool(2**30)).reservation(probe)
    assert steady < peak  # a global selection's prefill holds more than it keeps
    scheduler = Scheduler(llm, KVPool(peak + steady - 1))
    recorder = Recorder()
    first, second = (
        scheduler.submit(Request(prompt, params, policy="laprox", budget=0.25), recorder)
        for _ in range(2)
    )
    seen = []
    while not scheduler.idle():
        scheduler.step()
        stats = scheduler.stats()
        seen.append((stats.admitted + stats.prefilling + stats.running, stats.waiting))
        assert stats.pool_used_bytes <= stats.pool_bytes
    assert seen[0] == (1, 1)  # the second was admitted, then handed back for the first's peak
    alone = LLM(llm.model_dir, dtype="float32", min_cache=MIN_CACHE, policy="laprox", budget=0.25)
    (expected,) = alone.engine.generate([prompt], params, alone._stopper(params))
    assert recorder.tokens(first) == recorder.tokens(second) == expected.token_ids
    assert scheduler.pool.used_bytes == 0


def test_questions_on_a_compressed_context_decode_together_as_they_would_alone(llm):
    """`chat(questions, context=...)` submits each question as a request that continues a copy
    of the compressed arena: they run in one batch, and each answer is the one it gets alone."""
    asker = LLM(llm.model_dir, dtype="float32", min_cache=MIN_CACHE, policy="snapkv", budget=0.3)
    words = ["red", "blue", "green", "apple", "stone", "river", "cloud", "seven"]
    document = " ".join(words[(3 * j) % 8] for j in range(16))
    context = asker.compress(document, max_question_tokens=48, max_new_tokens=10)
    questions = ["which colour?", "which fruit?", "how many rivers?"]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    scheduler = asker._requests()
    scheduler.reset_peaks()
    together = asker.chat(questions, params, context=context)
    assert scheduler.stats().peak_admitted == len(questions)
    for question, answer in zip(questions, together, strict=True):
        (alone,) = asker.chat([question], params, context=context)
        assert answer.token_ids == alone.token_ids and len(answer.token_ids) == 10
    assert scheduler.pool.used_bytes == 0


def test_a_long_prompt_prefills_a_query_chunk_per_step(tiny_llama_dir):
    """With prefill chunks of 32 rows, a prompt of n tokens takes ceil(n / 32) steps a layer:
    the running batch decodes a token after each chunk, not after each layer."""
    chunked = LLM(tiny_llama_dir, dtype="float32", min_cache=MIN_CACHE, prefill_chunk=32)
    scheduler, recorder = Scheduler(chunked, KVPool(2**24), prefill_share=0.0), Recorder()
    short, long = prompts(chunked, 3)[0], prompts(chunked, 3)[-1]
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    first = scheduler.submit(Request(short, params), recorder)
    while scheduler.stats().running == 0:
        scheduler.step()
    scheduler.submit(Request(long, params), recorder)
    steps = 0
    scheduler.step()  # admits the long prompt and runs its first chunk
    while scheduler.stats().prefilling:  # the last step also selects and samples
        scheduler.step()
        steps += 1
    chunks = -(-len(long) // 32)
    assert steps == chunks * chunked.config.num_layers
    assert len(recorder.tokens(first)) >= steps
    (expected,) = chunked.engine.generate([long], params, chunked._stopper(params))
    drain(scheduler)
    assert recorder.tokens(max(recorder.events)) == expected.token_ids


def test_a_recorded_request_equals_a_live_one_and_shows_its_compressed_state(llm):
    """A request may bring its prompt's recorded pass (the eval shares one between policies),
    its own stop rule, and a hook that sees the arena after compression: the answer equals the
    live request's, the hook sees the budget's arena, and the stop rule decides the end."""
    (ids,) = prompts(llm, 1)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine = Scheduler(llm, KVPool(1 << 30)).engine_for("snapkv", 0.3)
    seen = []
    live, recorded = llm.run_requests(
        [
            Request(ids, params, engine=engine),
            Request(
                ids, params, engine=engine, record=engine.record_prompt(ids),
                on_prefilled=lambda state: seen.append(state.arena.lengths.clone()),
            ),
        ]
    )  # fmt: skip
    assert recorded.token_ids == live.token_ids and len(live.token_ids) == 6
    (lengths,) = seen
    assert int(lengths.max()) < len(ids)  # the hook ran after compression
    direct, _ = engine.start([ids], params.max_new_tokens)
    assert torch.equal(lengths, direct.arena.lengths)

    class AfterTwo(StopChecker):
        def advance(self, seq, token, is_last):
            delta = super().advance(seq, token, is_last)
            if len(seq.token_ids) == 2:
                seq.finish_reason = "stop"
            return delta

    stopper = AfterTwo(None, ())
    (stopped,) = llm.run_requests([Request(ids, params, engine=engine, stopper=stopper)])
    assert stopped.token_ids == live.token_ids[:2] and stopped.finish_reason == "stop"
    wrong = Request(ids[:-1], params, engine=engine, record=engine.record_prompt(ids))
    with pytest.raises(RuntimeError, match="records must be the recorded passes"):
        llm.run_requests([wrong])


def test_the_prefill_share_sets_how_much_prefill_a_decode_step_waits_for(llm):
    """While a batch decodes, a step prefills for share / (1 - share) of the last decode step's
    time: with a decode step taken as 100 s, a share of 0.5 runs the whole prefill of a queued
    prompt in one step, and the answers are those of one chunk a step."""
    assert prefill_allowance(0.5, 0.2) == pytest.approx(0.2)
    assert prefill_allowance(0.75, 0.2) == pytest.approx(0.6)
    assert prefill_allowance(0.0, 0.2) == 0.0
    with pytest.raises(ValueError, match="prefill_share"):
        Scheduler(llm, KVPool(2**24), prefill_share=1.0)
    short, long = prompts(llm, 3)[0], prompts(llm, 3)[-1]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    texts = []
    for share in (0.0, 0.5):
        scheduler, recorder = Scheduler(llm, KVPool(2**24), prefill_share=share), Recorder()
        first = scheduler.submit(Request(short, params), recorder)
        while scheduler.stats().running == 0:
            scheduler.step()
        second = scheduler.submit(Request(long, params), recorder)
        scheduler.decode_seconds = 100.0  # a slow decode step: a large allowance
        scheduler.step()
        done = scheduler.stats().prefilling == 0 and scheduler.stats().running == 2
        assert done == (share > 0)  # share 0: one chunk, the prefill is still running
        drain(scheduler)
        texts.append((recorder.tokens(first), recorder.tokens(second)))
    assert texts[0] == texts[1]
