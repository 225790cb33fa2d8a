"""Step-phase benchmark: where a decode step's time goes, for each policy (issue 11, item 4).

What: the default model (or --model) prefills one prompt of real text per cell: the full cache
at `--reference` tokens (default 512) and every policy at `--budget` (5%) of `--length` (8128).
Each cell then decodes `--new-tokens` greedy steps `--repeats` times from a copy of its
prefilled state, the cells in turns, twice a round: once with the engine's clock stopped (the
step's wall time) and once with a running `StepClock` (nanokv/step_clock.py), which sums the
time of each phase of the step over its 30 layers: the model's projections, norms and MLP, the
eviction stage, the value norms of the new token, the arena write, attention (with the
per-slot emission for the policies that read it), the policy's observation written back, and
the LM head. One JSON line per cell (medians over the rounds) and a summary line: each cell's
step against the full cache at the reference length (issue 11's "within 10%" target) and each
phase against `streaming` at the same length, which reads as many slots and emits nothing.

Why: a policy's decode cost is emission plus its bookkeeping around the kernel, measured here
inside real steps, where the weight reads have left the caches cold, rather than in a loop of
their own (STYLE.md #10: ratios from one run on one machine).

    python bench/step_phases.py --threads 1                  # bf16, full@512 + policies @5% of 8128
    python bench/step_phases.py --length 1024 --new-tokens 8 --repeats 1 --policies snapkv
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from e2e import check_device_and_cells, emit, machine_info, stdlib_token_stream, sync

import nanokv
from nanokv.step_clock import STOPPED, StepClock

POLICY_CELLS = ("streaming", "h2o", "snapkv", "tova", "auv", "laprox", "quest@0.1")
BASELINE = "streaming"  # reads as many slots as the 5% policies and emits nothing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF-layout model dir (default: SmolLM2-135M)")
    p.add_argument("--length", type=int, default=8128, help="prompt tokens of the policy cells")
    p.add_argument("--reference", type=int, default=512, help="prompt tokens of the full cache")
    p.add_argument("--policies", nargs="*", default=list(POLICY_CELLS), help="NAME[@budget]")
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--new-tokens", type=int, default=33, help="decode steps + 1 a round")
    p.add_argument("--repeats", type=int, default=3, help="rounds; medians reported")
    dtypes = ["auto", "float32", "bfloat16", "float16"]
    p.add_argument("--dtype", default="bfloat16", choices=dtypes)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="order of the stdlib files in the prompt")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    args = p.parse_args(argv)
    if min(args.length, args.reference) < 1 or args.new_tokens < 2 or args.repeats < 1:
        p.error("--length and --reference must be >= 1, --new-tokens >= 2, --repeats >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return check_device_and_cells(p, args)


@dataclass
class Cell:
    """One policy, budget and prompt length: its prefilled state and what its rounds measured."""

    policy: str
    budget: float
    length: int
    engine: object = None  # the cell's own Engine (policy, budget, cached Gram matrices)
    prefilled: object = None  # (state, logits) after prefill
    step_ms: list[float] = field(default_factory=list)  # per round, clock stopped
    phases: list[dict[str, float]] = field(default_factory=list)  # per round, ms a step

    @property
    def name(self) -> str:
        return f"{self.policy}@{self.budget}@{self.length}"


def make_cells(args: argparse.Namespace) -> list[Cell]:
    """The full cache at the reference length, then each policy cell at `--length`."""
    cells = [Cell("full", 1.0, args.reference)]
    return cells + [Cell(policy, budget, args.length) for policy, budget in args.cells]


def prefill(llm: nanokv.LLM, cell: Cell, stream: list[int], new_tokens: int) -> None:
    llm.configure(cell.policy, budget=cell.budget, min_cache=0)
    cell.engine = llm.engine
    cell.prefilled = cell.engine.start([stream[: cell.length]], new_tokens)


def decode(cell: Cell, steps: int, clock: StepClock, device: torch.device) -> float:
    """`steps` greedy steps from a copy of the cell's prefilled state with `clock` on the
    engine; returns the wall ms a step."""
    engine = cell.engine
    state, logits = cell.prefilled
    state, tokens = state.clone(), logits.argmax(-1)
    engine.clock = clock
    try:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            tokens = engine.step(state, tokens).argmax(-1)
        sync(device)
        return (time.perf_counter() - start) * 1e3 / steps
    finally:
        engine.clock = STOPPED


def measure(llm: nanokv.LLM, cells: list[Cell], args: argparse.Namespace) -> None:
    """Rounds of every cell in turns, untimed then timed by phase, so that load from other
    processes falls on every cell alike."""
    steps = args.new_tokens - 1
    clock_sync = (lambda: torch.cuda.synchronize(llm.device)) if llm.device.type == "cuda" else None
    for round_ in range(args.repeats):
        for cell in cells:
            cell.step_ms.append(decode(cell, steps, STOPPED, llm.device))
            clock = StepClock(sync=clock_sync)
            decode(cell, steps, clock, llm.device)
            cell.phases.append(clock.ms_per_step())
        print(f"# round {round_ + 1}/{args.repeats} done", file=sys.stderr, flush=True)


def median_phases(cell: Cell) -> dict[str, float]:
    names = sorted({name for phases in cell.phases for name in phases})
    return {
        name: round(statistics.median(p.get(name, 0.0) for p in cell.phases), 3) for name in names
    }


def cell_line(cell: Cell, args: argparse.Namespace) -> dict:
    phases = median_phases(cell)
    return {
        "cell": cell.name, "policy": cell.policy, "budget": cell.budget, "length": cell.length,
        "dtype": args.dtype, "steps": args.new_tokens - 1, "rounds": args.repeats,
        "step_ms": round(statistics.median(cell.step_ms), 3),
        "step_ms_rounds": [round(ms, 3) for ms in cell.step_ms],
        "timed_step_ms": round(sum(phases.values()), 3), "phases_ms": phases,
    }  # fmt: skip


def summary_line(lines: list[dict]) -> dict:
    """Each cell's step over the reference full cache's, and each policy's phases minus the
    baseline's at the same length."""
    reference = lines[0]
    baseline = next((line for line in lines if line["policy"] == BASELINE), None)
    summary: dict = {"summary": True, "reference": reference["cell"]}
    summary["speed_vs_reference"] = {
        line["cell"]: round(reference["step_ms"] / line["step_ms"], 3) for line in lines[1:]
    }
    if baseline is not None:
        summary["baseline"] = baseline["cell"]
        summary["extra_ms_vs_baseline"] = {
            line["cell"]: phase_deltas(line, baseline) for line in lines[1:] if line is not baseline
        }
    return summary


def phase_deltas(line: dict, baseline: dict) -> dict[str, float]:
    """Phase -> ms a step above the baseline (attention with and without emission compared as
    one phase); "step" is the untimed step's difference."""

    def merged(phases: dict[str, float]) -> dict[str, float]:
        out = dict(phases)
        out["attention"] = out.pop("attention", 0.0) + out.pop("attention + emission", 0.0)
        return out

    mine, base = merged(line["phases_ms"]), merged(baseline["phases_ms"])
    deltas = {name: round(mine.get(name, 0.0) - base.get(name, 0.0), 3) for name in mine}
    deltas["step"] = round(line["step_ms"] - baseline["step_ms"], 3)
    return deltas


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    llm = nanokv.LLM(args.model, dtype=args.dtype, device=args.device)
    cells = make_cells(args)
    stream = stdlib_token_stream(llm.tokenizer.encode, max(c.length for c in cells), args.seed)
    sink: list[str] = []
    dtype = str(llm.dtype).removeprefix("torch.")
    emit({"machine": machine_info(llm.device), "dtype": dtype}, sink)
    with torch.inference_mode():
        for cell in cells:
            prefill(llm, cell, stream, args.new_tokens)
            print(f"# prefilled {cell.name}", file=sys.stderr, flush=True)
        measure(llm, cells, args)
    lines = [cell_line(cell, args) for cell in cells]
    for line in lines:
        emit(line, sink)
    emit(summary_line(lines), sink)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(line + "\n" for line in sink))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
