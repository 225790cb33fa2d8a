"""Weight-layout benchmark: decode with the weights held in each layout, in one process.

What: the default model (or --model) in fp32 on the CPU; the full cache at `--reference` tokens
(default 512) and `--policy` (laprox) at `--budget` (5%) of `--length` (8128) tokens of real
text, each prefilled once. Then `--repeats` rounds; in each round every cell decodes
`--new-tokens` greedy steps from a copy of its prefilled state once with the weights laid out
output-major (the checkpoint's (out, in), what `F.linear` reads as x @ W^T) and once
input-major (the same values held as an (in, out) tensor: x @ W_t), switching the model's layout
in place between the two (`prepare_weights`), the order alternating from round to round. The
input-major layout is the loader's: only weights with at least as many outputs as inputs
(`pays_input_major`); a third, `input-major-all`, lays out the narrow ones (an MLP's down
projection) input-major too, the loader's rule before it was measured slower. Also a GEMV
micro-benchmark (one row times every weight a step reads, fused as it reads them, in each
layout) and the machine's copy bandwidth. JSON lines: one a cell and layout (medians, ms a
step), the GEMVs, and a summary with the step ratios to the input-major layout and whether the
greedy tokens agree. With `--dtype bfloat16` the layouts are the packed copies the loader picks
from on a CPU with bf16 instructions: `c-blocked` (kernels/cpu_linear.c's blocks, the norm, RoPE,
GLU and residuals done by the kernel), `onednn-packed` (oneDNN's blocked layout) and
`output-major` (the dense weights through `torch.mv`), ratios to `c-blocked`.

Why: batch-1 decode is a chain of GEMVs, and how fast a CPU reads them depends on the layout:
MKL's fp32 GEMV of one row reads the two layouts at different speeds on some CPUs, and in bf16
oneDNN's packed GEMV reads below what a core can (models/linear.py); the loader picks by the
machine, and this measures the choice on the machine at hand (STYLE.md #10: ratios from one run).

    python bench/weight_layout.py --threads 1
    python bench/weight_layout.py --threads 1 --dtype bfloat16
    python bench/weight_layout.py --length 1024 --new-tokens 8 --repeats 1      # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from e2e import copy_bandwidth_gb_s, emit, machine_info, stdlib_token_stream
from torch import nn

import nanokv
from nanokv.models.linear import (
    WeightLayout,
    cpu_vendor,
    is_input_major,
    laid_out,
    linear,
)


def every_weight_input_major(model: nn.Module) -> None:
    """The loader's input-major layout, then the projections it keeps output-major (narrow
    ones, unfused) re-laid input-major too, in place."""
    model.prepare_weights(WeightLayout(input_major=True))
    for module in model.modules():
        if isinstance(module, nn.Linear) and not is_input_major(module.weight):
            module.weight = nn.Parameter(laid_out(module.weight, True), requires_grad=False)


LAYOUTS = {
    "output-major": lambda model: model.prepare_weights(WeightLayout()),
    "input-major": lambda model: model.prepare_weights(WeightLayout(input_major=True)),
    "input-major-all": every_weight_input_major,
}
HALF_LAYOUTS = {
    "c-blocked": lambda model: model.prepare_weights(WeightLayout(packing="blocked")),
    "onednn-packed": lambda model: model.prepare_weights(WeightLayout(packing="onednn")),
    "output-major": lambda model: model.prepare_weights(WeightLayout()),
}
REFERENCE = {"float32": "input-major", "bfloat16": "c-blocked"}  # the summary's denominator


def add_cell_options(p: argparse.ArgumentParser, repeats: int) -> None:
    """The options of a two-cell A/B bench (this one, bench/compile_step.py): the model, the
    full cache at --reference tokens, --policy at --budget of --length, the rounds."""
    p.add_argument("--model", default=None, help="HF-layout model dir (default: SmolLM2-135M)")
    p.add_argument("--reference", type=int, default=512, help="prompt tokens of the full cache")
    p.add_argument("--length", type=int, default=8128, help="prompt tokens of the policy cell")
    p.add_argument("--policy", default="laprox")
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--new-tokens", type=int, default=25, help="decode steps + 1 a round")
    p.add_argument("--repeats", type=int, default=repeats, help="rounds; medians reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="order of the stdlib files in the prompt")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")


def check_cell_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`p.error` (exit status 2) for a count or budget `add_cell_options` cannot run with."""
    if min(args.reference, args.length) < 1 or args.new_tokens < 2 or args.repeats < 1:
        p.error("--reference and --length must be >= 1, --new-tokens >= 2, --repeats >= 1")
    if not 0 < args.budget <= 1:
        p.error("--budget must be in (0, 1]")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_options(p, repeats=6)
    p.add_argument("--dtype", default="float32", choices=list(REFERENCE))
    args = p.parse_args(argv)
    check_cell_options(p, args)
    return args


@dataclass
class Cell:
    """One policy, budget and prompt length: its prefilled state, and per variant (a layout
    here) its step times a round and its last greedy tokens."""

    policy: str
    budget: float
    length: int
    engine: object = None
    prefilled: object = None  # (state, logits)
    step_ms: dict[str, list[float]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.policy}@{self.budget}@{self.length}"


def prefilled_cells(llm: nanokv.LLM, args: argparse.Namespace) -> list[Cell]:
    """The full cache at --reference and --policy at --budget of --length tokens of real text,
    each prefilled once (exact budgets)."""
    stream = stdlib_token_stream(llm.tokenizer.encode, max(args.reference, args.length), args.seed)
    cells = [Cell("full", 1.0, args.reference), Cell(args.policy, args.budget, args.length)]
    with torch.inference_mode():
        for cell in cells:
            llm.configure(cell.policy, budget=cell.budget, min_cache=0)
            cell.engine = llm.engine
            cell.prefilled = cell.engine.start([stream[: cell.length]], args.new_tokens)
            print(f"# prefilled {cell.name}", file=sys.stderr, flush=True)
    return cells


def decode(cell: Cell, steps: int) -> tuple[float, list[int]]:
    """`steps` greedy steps from a copy of the cell's prefilled state: (ms a step, tokens)."""
    state, logits = cell.prefilled
    state, tokens, out = state.clone(), logits.argmax(-1), []
    start = time.perf_counter()
    for _ in range(steps):
        tokens = cell.engine.step(state, tokens).argmax(-1)
        out.append(int(tokens[0]))
    return (time.perf_counter() - start) * 1e3 / steps, out


def step_weights(model: torch.nn.Module) -> list[object]:
    """What `linear` reads in a decode step, fused as it reads them (Llama's or OPT's blocks): the
    dense weights, or their packed copies."""
    weights = []
    for block in model.blocks:
        attn = block.self_attn
        weights += [attn.qkv_weight, getattr(attn, "o_weight", getattr(attn, "out_weight", None))]
        mlp = getattr(block, "mlp", None)
        weights += [mlp.gate_up_weight, mlp.down_weight] if mlp is not None else block.fc_weights
    return weights + [model.head if model.head_read is None else model.head_read]


def gemv_lines(model: torch.nn.Module, layouts: dict, repeats: int = 5) -> list[dict]:
    """One row times every weight a decode step reads (`step_weights`), in each layout: the
    weights' bytes over the best of `repeats` passes."""
    lines = []
    for layout, lay_out_model in layouts.items():
        lay_out_model(model)
        weights = step_weights(model)
        dtype = model.head.dtype
        rows = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype) for w in weights}
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for weight in weights:
                linear(rows[weight.shape[1]], weight, None)
            best = min(best, time.perf_counter() - start)
        size = sum(w.shape[0] * w.shape[1] * dtype.itemsize for w in weights)
        lines.append({
            "bench": "weight_layout-gemv", "layout": layout, "weights": len(weights),
            "bytes": size, "ms": round(best * 1e3, 2), "gb_s": round(size / best / 1e9, 2),
        })  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    llm = nanokv.LLM(args.model, dtype=args.dtype, device="cpu")
    model, steps, sink = llm.model, args.new_tokens - 1, []
    layouts, reference = (
        (LAYOUTS if args.dtype == "float32" else HALF_LAYOUTS),
        REFERENCE[args.dtype],
    )
    loaded = model.layout
    emit({
        "machine": machine_info(llm.device), "cpu_vendor": cpu_vendor(), "dtype": args.dtype,
        "loader_layout": loaded.name,
    }, sink)  # fmt: skip
    cells = prefilled_cells(llm, args)
    bandwidths = [copy_bandwidth_gb_s(llm.device)]
    with torch.inference_mode():
        for round_ in range(args.repeats):
            order = list(layouts) if round_ % 2 == 0 else list(reversed(layouts))
            for layout in order:
                layouts[layout](model)
                for cell in cells:
                    ms, tokens = decode(cell, steps)
                    cell.step_ms.setdefault(layout, []).append(ms)
                    cell.tokens[layout] = tokens
            bandwidths.append(copy_bandwidth_gb_s(llm.device))
            print(f"# round {round_ + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        for line in gemv_lines(model, layouts):
            emit(line, sink)
    model.prepare_weights(loaded)
    summary = {"bench": "weight_layout-summary", "copy_gb_s": round(max(bandwidths), 2)}
    for cell in cells:
        medians = {k: statistics.median(v) for k, v in cell.step_ms.items()}
        for layout, ms in medians.items():
            emit({
                "bench": "weight_layout", "cell": cell.name, "layout": layout, "steps": steps,
                "rounds": args.repeats, "step_ms": round(ms, 2),
                "step_ms_rounds": [round(x, 2) for x in cell.step_ms[layout]],
            }, sink)  # fmt: skip
        for layout in layouts:
            if layout != reference:
                summary[f"{cell.name} {layout} / {reference} step"] = round(
                    medians[layout] / medians[reference], 3
                )
        summary[f"{cell.name} same greedy tokens"] = all(
            tokens == cell.tokens[reference] for tokens in cell.tokens.values()
        )
    emit(summary, sink)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(line + "\n" for line in sink))
    return 0


if __name__ == "__main__":
    sys.exit(main())
