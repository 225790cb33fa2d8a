"""dtype fidelity: how far bf16 (or fp16) moves the model's predictions from fp32 on real text.

What: the eval's fidelity suite (nanokv/eval/fidelity.py) with the dtype as the variable instead
of the cache. Each case is a window of standard-library text (`docs`: the bundled reference
manual, `code`: a long Python file), `--length` context tokens then `--tokens` continuation
tokens, seeds 0..`--cases`-1 per source. The context is prefilled and the true continuation is
fed one token at a time (teacher forcing), once with the model and its KV arena in float32 (the
reference) and once in each of `--dtypes`, both with the same cache policy (default: the full
cache; `--policy NAME --budget B` runs that policy, with an exact budget, in both). One JSON line
per case and dtype gives the top-1 agreement of the next-token predictions with fp32, the mean
KL(fp32 || dtype), the per-layer cosine of the first decoded token's attention outputs (and
their mean and minimum), and both runs' top-1 accuracy on the true continuation; a summary line
closes with the means per dtype and the command line.

Why: `--dtype auto` picks bf16 wherever the hardware does it natively, for speed; this is what
that costs in fidelity, measured with the same cases and metrics as the cache policies (issue 11),
so a dtype's error and a policy's error read on one scale.

    python bench/dtype_fidelity.py                             # bf16 vs fp32, 4 + 4 windows of 512
    python bench/dtype_fidelity.py --cases 2 --length 256 --tokens 32          # quick
    python bench/dtype_fidelity.py --dtypes bfloat16 float16 --sources docs --out x.jsonl
    python bench/dtype_fidelity.py --policy laprox --budget 0.05   # laprox@5%: bf16 vs fp32
    python bench/dtype_fidelity.py --dtypes float32 --kv-dtype bfloat16   # fp32, bf16 KV cache
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import nanokv
from nanokv.budget import Budget
from nanokv.dtypes import DTYPES, cpu_bf16_flags, dtype_label
from nanokv.eval.fidelity import (
    SOURCES,
    FidelityCase,
    FidelitySpec,
    Trace,
    compare,
    make_fidelity_case,
    teacher_force,
)
from nanokv.eval.specs import PolicySpec, engine_for, parse_spec

PROG = "dtype_fidelity.py"
REFERENCE = "float32"
EXIT_BAD_INPUT = 2
SUMMARY_KEYS = ("agreement", "kl", "cosine_mean", "accuracy", "accuracy_reference")


class UsageError(ValueError):
    """A command-line value that cannot be used."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage, so that every bad input ends
    the same way: one line on stderr, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


# ------------------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, validated; a bad one raises UsageError (see the module docstring)."""
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF-layout model dir (default: SmolLM2-135M)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], help="compared with float32")
    p.add_argument(
        "--kv-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="the compared runs' KV cache dtype (auto: each run's model dtype)",
    )  # fmt: skip
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--length", type=int, default=512, help="context tokens of a window")
    p.add_argument("--tokens", type=int, default=64, help="teacher-forced continuation tokens")
    p.add_argument("--cases", type=int, default=4, help="windows per source (seeds 0..n-1)")
    p.add_argument("--policy", default="full", help="eval policy spec, NAME[:key=value,...]")
    p.add_argument("--budget", type=float, default=1.0, help="the policy's budget (exact)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    args = p.parse_args(argv)
    args.dtypes = list(dict.fromkeys(dtype_name(text) for text in args.dtypes))
    args.sources = list(dict.fromkeys(args.sources))
    check_counts(args)
    args.spec = policy_spec(args.policy, args.budget)
    return args


def dtype_name(text: str) -> str:
    """'bf16' -> 'bfloat16'; an unknown name raises UsageError naming the choices."""
    if text not in DTYPES:
        raise UsageError(f"unknown dtype {text!r}; choose float32, bfloat16 or float16")
    return str(DTYPES[text]).removeprefix("torch.")


def check_counts(args: argparse.Namespace) -> None:
    """Raises UsageError for a count the suite cannot run with, or an --out it cannot write."""
    if args.length < 1:
        raise UsageError(f"--length must be a positive number of tokens, got {args.length}")
    if args.tokens < 2:
        raise UsageError(
            f"--tokens must be >= 2 (the first is the first decoded), got {args.tokens}"
        )
    if args.cases < 1:
        raise UsageError(f"--cases must be >= 1, got {args.cases}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.out is not None and not args.out.resolve().parent.is_dir():
        raise UsageError(f"--out {args.out}: its directory does not exist")


def policy_spec(text: str, budget: float) -> PolicySpec:
    """The eval's policy spec of `--policy`, checked with its budget before anything loads."""
    spec = parse_spec(text)
    if spec.needle_oracle:
        raise UsageError("--policy: the needle oracle needs a needle; use a plain policy")
    Budget(budget)  # a bad budget fails here, with the Budget's own message
    return spec


# ------------------------------------------------------------------------------------- running


def load(args: argparse.Namespace, dtype: str, kv_dtype: str = "auto") -> nanokv.LLM:
    """The model in `dtype` (its KV cache in `kv_dtype`) on `args.device`."""
    return nanokv.LLM(args.model, dtype=dtype, kv_dtype=kv_dtype, device=args.device)


def make_cases(args: argparse.Namespace, llm: nanokv.LLM) -> list[FidelityCase]:
    """Every (source, seed) window, tokenized; the model's context must hold a window."""
    context = llm.config.max_position_embeddings
    if args.length + args.tokens > context:
        raise UsageError(
            f"--length {args.length} + --tokens {args.tokens} exceed the model's context "
            f"({context} tokens)"
        )
    specs = [
        FidelitySpec(source, args.length, args.tokens, seed)
        for source in args.sources
        for seed in range(args.cases)
    ]
    return [make_fidelity_case(spec, llm.tokenizer) for spec in specs]


def run_cases(llm: nanokv.LLM, args: argparse.Namespace, cases: list[FidelityCase]) -> list[Trace]:
    """Teacher-forces every case with the policy of `args`, exact budget (no cache floor)."""
    dtype = dtype_label(llm.dtype, llm.kv_dtype)
    traces = []
    for index, case in enumerate(cases):
        engine, _ = engine_for(llm, args.spec, args.budget, min_cache=0)
        began = time.perf_counter()
        traces.append(teacher_force(engine, case))
        seconds = time.perf_counter() - began
        progress(f"{dtype} {index + 1}/{len(cases)}: {case.spec.id} ({seconds:.1f} s)")
    return traces


def progress(text: str) -> None:
    """A progress line on stderr (stdout carries only the JSON lines)."""
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------- report


def case_line(case: FidelityCase, dtype: str, trace: Trace, reference: Trace) -> dict:
    """The JSON object of one case in one dtype, compared with the float32 run."""
    result = compare(reference, trace, case.continuation)
    cosine = result["cosine"]
    spec = case.spec
    return {
        "bench": "dtype_fidelity", "dtype": dtype, "reference": REFERENCE, "case": spec.id,
        "source": spec.source, "file": case.text_name, "length": spec.length,
        "tokens": spec.tokens, "seed": spec.seed, "agreement": result["agreement"],
        "kl": result["kl"], "cosine_mean": round(statistics.fmean(cosine), 6),
        "cosine_min": min(cosine), "cosine": cosine, "accuracy": result["accuracy"],
        "accuracy_reference": result["accuracy_full"],
        "kept_tokens": round(trace.kept_tokens, 2),
        "kept_tokens_reference": round(reference.kept_tokens, 2),
    }  # fmt: skip


def dtype_means(lines: list[dict]) -> dict[str, float]:
    """Means over one dtype's cases, and the worst case of KL and cosine."""
    means = {key: statistics.fmean(line[key] for line in lines) for key in SUMMARY_KEYS}
    means["kl_max"] = max(line["kl"] for line in lines)
    means["cosine_min"] = min(line["cosine_min"] for line in lines)
    means["cosine_mean"] = round(means["cosine_mean"], 6)
    return means


def summary_line(lines: list[dict], args: argparse.Namespace, argv: list[str]) -> dict:
    """The final JSON object: means per dtype, what was run, on what, and the command line."""
    labels = dict.fromkeys(x["dtype"] for x in lines)  # 'bfloat16', 'float32+kv-bfloat16'
    by_dtype = {label: [x for x in lines if x["dtype"] == label] for label in labels}
    return {
        "bench": "dtype_fidelity-summary", "reference": REFERENCE,
        "means": {dtype: dtype_means(rows) for dtype, rows in by_dtype.items()},
        "cases": len(lines) // len(labels), "sources": args.sources,
        "length": args.length, "tokens": args.tokens, "policy": args.spec.label,
        "budget": 1.0 if args.spec.is_full else args.budget, "min_cache": 0,
        "model": args.model_dir, "device": args.device, "machine": machine_info(),
        "command": shlex.join(["python", f"bench/{PROG}", *argv]),
    }  # fmt: skip


def machine_info() -> dict:
    """What the numbers were computed on (bf16 arithmetic differs between CPU paths)."""
    return {
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flags": list(cpu_bf16_flags()),
    }  # fmt: skip


def emit(line: dict, sink: list[str]) -> None:
    """Prints one JSON line now (a long run shows progress) and keeps it for --out."""
    text = json.dumps(line)
    print(text, flush=True)
    sink.append(text)


# ---------------------------------------------------------------------------------------- main


def dtype_lines(
    llm: nanokv.LLM, args: argparse.Namespace, cases: list[FidelityCase], references: list[Trace]
) -> list[dict]:
    """Every case run in `llm`'s dtypes, compared with its float32 trace."""
    dtype = dtype_label(llm.dtype, llm.kv_dtype)
    traces = run_cases(llm, args, cases)
    return [
        {**case_line(case, dtype, trace, reference), "model": args.model_dir}
        for case, trace, reference in zip(cases, traces, references, strict=True)
    ]


def bad_input(exc: BaseException) -> int:
    """One line on stderr for input that cannot be used; the exit status 2."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def prepare(argv: list[str]) -> tuple[argparse.Namespace, nanokv.LLM, list[FidelityCase]]:
    """Options, the float32 reference model and the cases; any bad input raises here, before
    anything is measured."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reference = load(args, REFERENCE)
    args.model_dir = str(reference.model_dir)
    return args, reference, make_cases(args, reference)


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison; returns the process exit status (2: bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, reference_llm, cases = prepare(argv)
    except (ValueError, OSError, RuntimeError) as exc:
        return bad_input(exc)
    references = run_cases(reference_llm, args, cases)
    sink, lines = [], []
    for dtype in args.dtypes:
        same = dtype == REFERENCE and args.kv_dtype in ("auto", REFERENCE)
        llm = reference_llm if same else load(args, dtype, args.kv_dtype)
        for line in dtype_lines(llm, args, cases, references):
            lines.append(line)
            emit(line, sink)
        del llm  # one model besides the reference at a time
    emit(summary_line(lines, args, argv), sink)
    if args.out is not None:
        args.out.resolve().write_text("\n".join(sink) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
