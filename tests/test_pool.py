"""The KV pool's accounting: unit behaviour, and a property test that drives the scheduler with
random arrivals, evictions, cancellations and finishes and checks that memory is never lost or
counted twice, and that the pool is empty when every request is done."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanokv import LLM
from nanokv.pool import KVPool, PoolFullError, parse_size
from nanokv.sampling import SamplingParams
from nanokv.scheduler import Scheduler
from nanokv.sequence import Request


def test_reserve_resize_release_count_exactly():
    pool = KVPool(1000)
    pool.reserve(1, 3, 600)
    with pytest.raises(PoolFullError) as full:
        pool.reserve(2, 2, 500)
    assert not full.value.never
    with pytest.raises(PoolFullError) as never:
        pool.reserve(2, 9, 1001)
    assert never.value.never
    with pytest.raises(ValueError, match="already holds"):
        pool.reserve(1, 1, 10)
    pool.resize(1, 1, 200)
    pool.reserve(2, 2, 500)
    assert (pool.used_bytes, pool.used_pages, pool.free_bytes) == (700, 3, 300)
    with pytest.raises(PoolFullError):
        pool.resize(1, 4, 600)
    assert pool.release(1) == 200 and pool.release(1) == 0
    assert pool.release(2) == 500 and pool.used_bytes == 0 and pool.holders() == {}


@pytest.mark.parametrize(
    ("text", "size"),
    [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("4096", 4096),
     ("64 KiB", 65536), ("3M", 3_000_000)],
)  # fmt: skip
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1GiB", "0", "2PB", ""])
def test_parse_size_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_size(text)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, dtype="float32", min_cache=4)


POLICIES = [(None, None), ("snapkv", 0.3), ("streaming", 10), ("laprox", 0.25), ("tova", 0.5)]
submit = st.tuples(
    st.just("submit"), st.integers(3, 90), st.integers(1, 24), st.sampled_from(POLICIES)
)
cancel = st.tuples(st.just("cancel"), st.integers(0, 50))
run = st.tuples(st.just("step"), st.integers(1, 12))


@given(operations=st.lists(st.one_of(submit, cancel, run), min_size=1, max_size=30))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_the_pool_never_loses_or_double_counts_memory(llm, operations):
    engine = llm.engine
    pool = KVPool(engine.arena_bytes(160) * 2)  # about two full 160-token requests
    scheduler = Scheduler(llm, pool, max_waiting=100)
    finishes: dict[int, int] = {}
    submitted: list[int] = []

    def on_event(event):
        finishes[event.request_id] = finishes.get(event.request_id, 0) + event.finished

    for operation in operations:
        if operation[0] == "submit":
            _, length, new_tokens, (policy, budget) = operation
            prompt = [5 + (i * 7) % 300 for i in range(length)]
            params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            request = Request(prompt, params, policy=policy, budget=budget)
            submitted.append(scheduler.submit(request, on_event))
        elif operation[0] == "cancel" and submitted:
            scheduler.cancel(submitted[operation[1] % len(submitted)])
        else:
            for _ in range(operation[1]):
                scheduler.step()
                check_accounting(scheduler)
    while not scheduler.idle():
        scheduler.step()
        check_accounting(scheduler)
    assert pool.used_bytes == 0 and pool.holders() == {}
    assert finishes == {request_id: 1 for request_id in submitted}


def check_accounting(scheduler: Scheduler) -> None:
    """Every admitted request holds exactly its reservation, at least its arena's bytes and
    the queries its deferred statistics keep, and nothing else holds pages."""
    pool, admitted = scheduler.pool, scheduler.admitted()
    holders = pool.holders()
    assert set(holders) == {item.request_id for item in admitted}
    assert pool.used_bytes == sum(nbytes for _, nbytes in holders.values()) <= pool.capacity_bytes
    for item in admitted:
        pages, nbytes = holders[item.request_id]
        if item.state is not None:
            pending = sum(q.nbytes for layer in item.state.pending for q in layer)
            assert nbytes >= item.state.arena.nbytes + pending
            assert pages * 16 >= item.state.arena.capacity * llm_rows(scheduler)


def llm_rows(scheduler: Scheduler) -> int:
    cfg = scheduler.llm.config
    return cfg.num_layers * cfg.num_kv_heads
