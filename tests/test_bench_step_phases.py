"""The step clock (nanokv/step_clock.py) and bench/step_phases.py on a tiny model: which phases a
step reports for which policy, that timing a step changes none of its results, and the bench's
lines (no timing is asserted beyond what the clock's arithmetic guarantees)."""

from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import assert_refuses, load_bench

import nanokv
from nanokv.step_clock import STOPPED, StepClock

PROMPT = list(range(3, 83))  # 80 tokens


def test_step_clock_sums_the_time_between_marks_under_the_ending_phase(monkeypatch):
    readings = iter([10.0, 10.5, 12.0, 20.0, 20.25, 20.5])
    monkeypatch.setattr("nanokv.step_clock.time.perf_counter", lambda: next(readings))
    clock = StepClock()
    clock.start()  # 10.0
    clock.mark("model")  # 0.5 s
    clock.mark("attention")  # 1.5 s
    clock.start()  # 20.0
    clock.mark("model")  # 0.25 s
    clock.mark("model")  # 0.25 s
    assert clock.steps == 2
    assert clock.ms_per_step() == {"model": 500.0, "attention": 750.0}


def test_a_mark_before_any_start_times_nothing():
    clock = StepClock()
    clock.mark("model")
    assert clock.seconds == {} and clock.ms_per_step() == {}


def _decode(engine, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    state, logits = engine.start([PROMPT], steps + 1)
    tokens, all_logits = [int(logits.argmax())], [logits]
    for _ in range(steps):
        logits = engine.step(state, torch.tensor(tokens[-1:]))
        tokens.append(int(logits.argmax()))
        all_logits.append(logits)
    return tokens, all_logits


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "laprox", "auv", "quest"])
def test_a_running_clock_times_every_phase_and_changes_no_result(tiny_llama_dir, policy):
    llm = nanokv.LLM(tiny_llama_dir)
    llm.configure(policy, budget=0.25, min_cache=0)
    engine, steps = llm.engine, 40  # past an eviction and DEFERRED_STEPS
    untimed_tokens, untimed_logits = _decode(engine, steps)
    engine.clock = clock = StepClock()
    try:
        tokens, logits = _decode(engine, steps)
    finally:
        engine.clock = STOPPED
    assert tokens == untimed_tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, untimed_logits, strict=True))
    assert clock.steps == steps
    emits, defers = False, policy in ("snapkv", "laprox", "auv")  # per step / deferred
    attention = "attention + emission" if emits else "attention"
    expected = {"model", "eviction", "value norms", "arena write", attention, "observation"}
    settled = {"deferred statistics"} if defers else set()
    assert set(clock.seconds) == expected | settled | {"lm head"}
    assert all(seconds > 0 for seconds in clock.seconds.values())


def test_step_phases_bench_writes_a_line_per_cell_and_a_summary(tiny_llama_dir, tmp_path, capsys):
    bench = load_bench("step_phases")
    out = tmp_path / "phases.jsonl"
    argv = [
        "--model", str(tiny_llama_dir), "--length", "80", "--reference", "40", "--budget", "0.25",
        "--policies", "streaming", "auv", "laprox+quest@0.5", "--new-tokens", "4", "--repeats", "2",
        "--dtype", "float32", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    header, cells, summary = lines[0], lines[1:-1], lines[-1]
    assert header["dtype"] == "float32"
    assert [c["cell"] for c in cells] == [
        "full@1.0@40", "streaming@0.25@80", "auv@0.25@80", "laprox+quest@0.5@80",
    ]  # fmt: skip
    for cell in cells:
        assert cell["steps"] == 3 and cell["rounds"] == 2 and cell["step_ms"] > 0
        assert cell["timed_step_ms"] == pytest.approx(sum(cell["phases_ms"].values()), abs=0.01)
    assert "attention + emission" in cells[3]["phases_ms"]  # Quest's pages: every step
    assert "attention + emission" not in cells[2]["phases_ms"]  # auv: deferred
    assert "attention + emission" not in cells[1]["phases_ms"]
    assert summary["reference"] == "full@1.0@40" and summary["baseline"] == "streaming@0.25@80"
    assert set(summary["speed_vs_reference"]) == {c["cell"] for c in cells[1:]}
    deltas = summary["extra_ms_vs_baseline"]["auv@0.25@80"]
    assert deltas["step"] == pytest.approx(cells[2]["step_ms"] - cells[1]["step_ms"], abs=0.002)
    assert "attention" in deltas and "attention + emission" not in deltas


def test_step_phases_bench_refuses_bad_options(capsys):
    assert_refuses("step_phases", ["--new-tokens", "1"], "--new-tokens >= 2", capsys)
