"""`nanokv generate | convert`: the command line. Bad input gets one line and exit status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanokv.budget import Budget
from nanokv.eval.cli import add_eval_parser
from nanokv.policies import POLICIES
from nanokv.policies.allocation import ALLOCATIONS
from nanokv.sampling import SamplingParams

EXIT_BAD_INPUT = 2
BENCHMARKS = ("kernels", "e2e", "policies")


class UsageError(ValueError):
    """A command-line value that cannot be used."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, RuntimeError) as exc:
        # Every nanokv error type derives from ValueError or RuntimeError; OSError covers files.
        print(f"nanokv: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanokv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands.add_parser("generate", help="generate text from prompts"))
    add_eval_parser(commands)
    bench = commands.add_parser("bench", help="run a benchmark script from bench/")
    bench.add_argument("name", choices=BENCHMARKS, help="kernels, e2e or policies")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    bench.set_defaults(run=_run_bench)
    convert = commands.add_parser("convert", help="convert the embedded default model")
    convert.add_argument("--out", type=Path, help="output directory (default: weights/...)")
    convert.add_argument("--force", action="store_true", help="convert even if it exists")
    convert.set_defaults(run=_run_convert)
    return parser


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", help="one or more prompts (a batch); '-' reads stdin")
    p.add_argument("--model", help="HF-layout model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument(
        "--policy", default="full",
        help=f"eviction policy: {', '.join(POLICIES)}, quest, or <policy>+quest",
    )  # fmt: skip
    p.add_argument("--budget", default="1.0", help="KV budget: fraction in (0,1] or token count")
    p.add_argument("--allocation", choices=ALLOCATIONS, help="budget split across heads/layers")
    p.add_argument("--min-head-share", type=float, help="layer/global: per-head floor (0-1)")
    p.add_argument("--max-head-share", type=float, help="layer/global: per-head cap (>= 1)")
    p.add_argument("--sinks", type=int, help="attention sinks always kept (default 4)")
    p.add_argument("--window", type=int, help="observation window, kept (default 32)")
    p.add_argument("--pool", type=int, help="max-pool kernel along tokens (odd)")
    p.add_argument("--chunk", type=int, help="keep whole chunks of C tokens (default 1)")
    p.add_argument("--decode-window", type=int, help="W: slots freed per eviction (default 16)")
    p.add_argument("--quest-budget", type=float, help="Quest read budget (fraction or tokens)")
    p.add_argument("--quest-oracle", action="store_true", help="rank pages by true attention")
    p.add_argument("--verbose", action="store_true", help="report what was kept, to stderr")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompts]
    if any(not p.strip() for p in prompts):
        raise UsageError("a prompt is empty: give the text to complete")
    budget = Budget.parse(args.budget)
    if args.policy not in POLICIES:
        raise UsageError(f"unknown policy {args.policy!r}; choose one of {', '.join(POLICIES)}")
    if args.policy == "full" and budget.value != 1.0:
        raise UsageError(
            f"--budget {args.budget} needs an eviction policy: 'full' keeps all tokens"
        )
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=args.stop,
    )  # fmt: skip
    from nanokv.llm import LLM

    options = dict(
        sinks=args.sinks, observation_window=args.window, pool=args.pool, chunk=args.chunk,
        decode_window=args.decode_window, allocation=args.allocation,
        min_head_share=args.min_head_share, max_head_share=args.max_head_share,
    )  # fmt: skip
    llm = LLM(
        args.model, policy=args.policy, budget=budget, dtype=args.dtype, device=args.device,
        quest_budget=args.quest_budget, quest_oracle=args.quest_oracle,
        **{name: value for name, value in options.items() if value is not None},
    )  # fmt: skip
    use_chat = not args.raw and llm.tokenizer.chat_template is not None
    run = llm.chat if use_chat else llm.generate
    if len(prompts) == 1:
        run(prompts, params, on_text=lambda _, text: print(text, end="", flush=True))
        print()
    else:
        for index, output in enumerate(run(prompts, params)):
            print(f"--- [{index}] ---\n{output.text}")
    if args.verbose:
        print(llm.last_report.summary(), file=sys.stderr)
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    """Runs bench/<name>.py of the source checkout with the remaining arguments."""
    import runpy

    script = Path(__file__).resolve().parent.parent / "bench" / f"{args.name}.py"
    if not script.is_file():
        raise UsageError(f"{script} not found: the benchmarks live in a source checkout of nanokv")
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from nanokv.default_model import convert_default_model

    out = convert_default_model(args.out, force=args.force)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
