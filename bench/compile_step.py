"""torch.compile benchmark: a decode step with the blocks' dense parts compiled or eager, in one
process.

What: the default model (or --model) on the CPU; the full cache at `--reference` tokens (512) and
`--policy` (laprox) at `--budget` (5%) of `--length` (8128) tokens of real text, each prefilled
once in eager mode. Then `--repeats` rounds; in each round every cell decodes `--new-tokens`
greedy steps from a copy of its prefilled state once per variant, the order alternating from
round to round: `eager`, and `torch.compile` (inductor, C++ on the CPU) of the two methods that
hold a block's dense work, `qkv` (norm, fused q/k/v projection, RoPE) and `finish` (output
projection, residuals, norm, MLP), in the modes of `--modes` (inductor's `default` and
`max-autotune-no-cudagraphs`, which also tunes inductor's own GEMM templates against the
library's). Attention, the arena and the policy stay eager: their shapes change every step. One
compiled function serves every block (the block is an argument, its weights are inputs), so a
mode compiles once (`compile_s`: the first steps' wall time, compilation included; `qkv` breaks
its graph once, where the RoPE tables' cache compares positions with `torch.equal`). JSON lines:
one a cell and variant (medians, ms a step) and a summary with each compiled step's ratio to
eager and whether the greedy tokens agree.

Why: issue 11 asks to try `torch.compile` of the decode step on the CPU and keep it only if a
benchmark says it wins. Batch-1 decode is its weight GEMVs (which a compiler hands to the same
BLAS) plus ~40 small ops a layer, the part fusion could shrink; this measures that on the machine
at hand (STYLE.md #10: ratios from one run).

    python bench/compile_step.py --threads 1
    python bench/compile_step.py --length 1024 --new-tokens 8 --repeats 1      # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from e2e import emit, machine_info
from weight_layout import Cell, add_cell_options, check_cell_options, decode, prefilled_cells

import nanokv

MODES = ("default", "max-autotune-no-cudagraphs")
DENSE_METHODS = ("qkv", "finish")  # a block's work before and after its attention


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_options(p, repeats=5)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    args = p.parse_args(argv)
    check_cell_options(p, args)
    return args


class DenseVariants:
    """The blocks' dense methods, eager or compiled per mode, swapped in on the block class (so
    that one compiled function serves every block). Where the loader packed the weights for
    oneDNN (bf16 on a CPU with bf16 instructions, models/linear.py), the compiled variants read
    the dense weights instead: inductor cannot read an opaque packed tensor."""

    def __init__(self, model: torch.nn.Module, modes: list[str]) -> None:
        self.model = model
        self.block_class = type(model.blocks[0])
        self.loaded = model.layout  # the loader's
        self.eager = {name: getattr(self.block_class, name) for name in DENSE_METHODS}
        self.compiled = {
            mode: {
                name: torch.compile(method, mode=mode, dynamic=False)
                for name, method in self.eager.items()
            }
            for mode in modes
        }

    @property
    def names(self) -> list[str]:
        return ["eager"] + [f"compile:{mode}" for mode in self.compiled]

    def use(self, variant: str) -> None:
        methods = self.eager if variant == "eager" else self.compiled[variant.partition(":")[2]]
        for name, method in methods.items():
            setattr(self.block_class, name, method)
        if self.loaded.pack:
            self.model.prepare_weights(self.loaded if variant == "eager" else self.loaded.unpacked)


def timed(run: Callable[[], object]) -> float:
    """Seconds `run()` took."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(cells: list[Cell], variants: DenseVariants, args: argparse.Namespace) -> dict:
    """Compiles each mode on its first steps, then runs the rounds; returns compile seconds."""
    steps, compile_s = args.new_tokens - 1, {}
    for variant in variants.names[1:]:
        variants.use(variant)
        compile_s[variant] = timed(lambda: [decode(cell, 1) for cell in cells])
        print(f"# {variant} compiled in {compile_s[variant]:.1f} s", file=sys.stderr)
    for round_ in range(args.repeats):
        order = variants.names if round_ % 2 == 0 else variants.names[::-1]
        for variant in order:
            variants.use(variant)
            for cell in cells:
                ms, cell.tokens[variant] = decode(cell, steps)
                cell.step_ms.setdefault(variant, []).append(ms)
        print(f"# round {round_ + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    return compile_s


def report(cells: list[Cell], variants: DenseVariants, compile_s: dict, sink: list[str]) -> None:
    """One line a cell and variant (medians), then the summary of ratios to eager."""
    summary = {"bench": "compile_step-summary", "compile_s": {
        variant: round(seconds, 1) for variant, seconds in compile_s.items()
    }}  # fmt: skip
    for cell in cells:
        medians = {variant: statistics.median(ms) for variant, ms in cell.step_ms.items()}
        for variant, ms in medians.items():
            rounds = cell.step_ms[variant]
            emit({
                "bench": "compile_step", "cell": cell.name, "variant": variant,
                "steps": len(cell.tokens[variant]), "rounds": len(rounds), "step_ms": round(ms, 2),
                "step_ms_rounds": [round(x, 2) for x in rounds],
            }, sink)  # fmt: skip
        for variant in variants.names[1:]:
            summary[f"{cell.name} {variant} / eager step"] = round(
                medians[variant] / medians["eager"], 3
            )
        summary[f"{cell.name} same greedy tokens"] = all(
            tokens == cell.tokens["eager"] for tokens in cell.tokens.values()
        )
    emit(summary, sink)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    llm = nanokv.LLM(args.model, dtype=args.dtype, device="cpu")
    variants, sink = DenseVariants(llm.model, args.modes), []
    dtype = str(llm.dtype).removeprefix("torch.")
    emit({"machine": machine_info(llm.device), "dtype": dtype}, sink)
    cells = prefilled_cells(llm, args)
    try:
        with torch.inference_mode():
            compile_s = measure(cells, variants, args)
    finally:
        variants.use("eager")
    report(cells, variants, compile_s, sink)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(line + "\n" for line in sink))
    return 0


if __name__ == "__main__":
    sys.exit(main())
