"""`nanokv eval niah|fidelity|code|chat|all`: run a grid, write results JSONL, summary.md and PNGs
(`all`: niah, fidelity and code; chat, minutes a conversation, runs on its own).

Bad input raises ValueError with one line (nanokv/cli.py prints it and exits with status 2)
before any model is loaded or anything is written.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from nanokv.dtypes import dtype_label
from nanokv.eval.grid import ALL, SUITES, Grid, resolve
from nanokv.eval.specs import NEEDLE_ORACLE, parse_spec
from nanokv.policies import parse_policy


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    """Adds `nanokv eval` to the command line."""
    p = commands.add_parser(
        "eval", help="evaluate policies (niah, fidelity, code, chat)", description=__doc__
    )
    p.add_argument(
        "suite", choices=[*SUITES, "all"], help="which suite to run (all: niah, fidelity, code)"
    )
    p.add_argument("--model", help="HF-layout model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument(
        "--policies", nargs="+", metavar="SPEC",
        help="policy specs NAME[:key=value,...], e.g. snapkv laprox:pool=31 quest:oracle "
        "needle-oracle (default: the preset's)",
    )  # fmt: skip
    p.add_argument("--budgets", nargs="+", type=float, help="fractions in (0,1] or token counts")
    p.add_argument(
        "--lengths", nargs="+", type=int,
        help="prompt / context lengths in tokens (chat: the ten user messages' tokens)",
    )  # fmt: skip
    p.add_argument("--depths", nargs="+", type=float, help="niah: needle depths in [0, 1]")
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="case seeds (each seed is a case; chat: a conversation)",
    )
    p.add_argument("--tasks", nargs="+", help="niah: single, multikey, multivalue")
    p.add_argument("--fillers", nargs="+", help="niah: neutral, prose")
    p.add_argument(
        "--setting", choices=["question", "context", "both"],
        help="niah: question-aware, context-only or both (default both)",
    )  # fmt: skip
    p.add_argument(
        "--needles", type=int, metavar="K",
        help="niah: K needles a document (K different keys at K evenly spaced depths, 0 to 1, "
        "instead of --depths), each asked in its own question: context-only compresses the "
        "document once and asks it all K; question-aware prompts it K times (default 1)",
    )  # fmt: skip
    p.add_argument("--texts", nargs="+", help="fidelity: docs, code")
    p.add_argument(
        "--facts", nargs="+",
        help="chat: where the fact is: first (its own first turn, the default) or inside (one "
        "sentence inside the passage of turn 2, 3 or 4)",
    )  # fmt: skip
    p.add_argument("--tokens", type=int, help="fidelity: teacher-forced continuation tokens")
    p.add_argument(
        "--cases", nargs="+", metavar="ID",
        help="run these case ids (e.g. niah/single/prose/L2048/d0.25/s0) instead of the grid's",
    )  # fmt: skip
    p.add_argument(
        "--min-cache", type=int, metavar="N",
        help="cache floor in tokens: no head is cut below it and a prompt + answer under it is "
        "never evicted (default 128; 0: every budget exact)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("nanokv-eval"), help="results directory")
    p.add_argument("--quick", action="store_true", help="the small grid (< 10 min on 2 cores)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument(
        "--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
        help="default float32: the results in docs/ were measured in it (auto: bf16 where native)",
    )  # fmt: skip
    p.add_argument(
        "--kv-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="the KV cache's dtype (default auto: the model's)",
    )  # fmt: skip
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(run=run_eval)


def grids(args: argparse.Namespace) -> dict[str, Grid]:
    """The grid of each requested suite: the preset with the given flags applied."""
    settings = None if args.setting in (None, "both") else (args.setting,)
    overrides = dict(
        policies=_tuple(args.policies), budgets=_tuple(args.budgets),
        lengths=_tuple(args.lengths), depths=_tuple(args.depths), seeds=_tuple(args.seeds),
        tasks=_tuple(args.tasks), fillers=_tuple(args.fillers), settings=settings,
        needles=args.needles, texts=_tuple(args.texts), facts=_tuple(args.facts),
        tokens=args.tokens,
        cases=_tuple(args.cases), min_cache=args.min_cache,
    )  # fmt: skip
    if args.needles is not None and args.needles > 1 and args.depths:
        raise ValueError(
            f"--needles {args.needles} puts the needles at {args.needles} evenly spaced depths: "
            "drop --depths"
        )
    suites = ALL if args.suite == "all" else (args.suite,)
    if args.suite == "all" and args.cases:  # only the suites the ids name
        suites = tuple(s for s in SUITES if any(c.startswith(f"{s}/") for c in args.cases))
    chosen = {suite: resolve(suite, args.quick, overrides) for suite in suites}
    if args.suite == "all":  # one --policies list for every suite: each keeps what it runs
        for suite, grid in chosen.items():
            chosen[suite] = replace(grid, policies=_runnable(suite, grid.policies))
    return chosen


def _runnable(suite: str, policies: tuple[str, ...]) -> tuple[str, ...]:
    """The policy specs `suite` can run: the needle oracle only where there is a needle (niah),
    Quest not in a conversation (chat)."""
    kept = policies
    if suite != "niah":
        kept = tuple(p for p in kept if not p.startswith(NEEDLE_ORACLE))
    if suite == "chat":
        kept = tuple(p for p in kept if not parse_policy(parse_spec(p).policy)[1])
    return kept


def _tuple(values: list | None) -> tuple | None:
    return None if values is None else tuple(values)


def run_eval(args: argparse.Namespace) -> int:
    chosen = grids(args)
    for suite, grid in chosen.items():
        grid.validate(suite)
    from nanokv.eval.corpus import corpus_fingerprint
    from nanokv.eval.results import ResultStore, check_meta
    from nanokv.eval.runner import run_jobs
    from nanokv.eval.suites import SUITE_JOBS
    from nanokv.llm import LLM
    from nanokv.loader import load_config, resolve_model_dir

    if args.model is not None:  # check the lengths against the model before loading it
        config = load_config(resolve_model_dir(args.model))
        for suite, grid in chosen.items():
            grid.validate(suite, config.max_position_embeddings)
    if not args.no_plots:
        from nanokv.eval.plots import pyplot

        pyplot()  # fail now, not after the run, when matplotlib is missing
    llm = LLM(args.model, dtype=args.dtype, kv_dtype=args.kv_dtype, device=args.device)
    for suite, grid in chosen.items():
        grid.validate(suite, llm.config.max_position_embeddings)
    if "chat" in chosen and llm.tokenizer.chat_template is None:
        raise ValueError(f"the chat suite needs a model with a chat template: {llm.model_dir.name}")
    out = args.out.resolve()
    meta = {
        "model": str(llm.model_dir.name), "corpus": corpus_fingerprint(),
        "dtype": dtype_label(llm.dtype, llm.kv_dtype),
    }  # fmt: skip
    check_meta(out, meta | {"min_cache": _min_cache(chosen)})
    for suite, grid in chosen.items():
        run_jobs(suite, SUITE_JOBS[suite](llm, grid), ResultStore(out, suite))
    return report(out, args.no_plots)


def _min_cache(chosen: dict[str, Grid]) -> int:
    """The run's cache floor: a row's id does not name it, so resuming into a directory made
    with another floor would silently keep rows at other budgets (check_meta refuses that)."""
    (floor,) = {grid.min_cache for grid in chosen.values()}  # one flag sets every suite's
    return floor


def report(out: Path, no_plots: bool = False) -> int:
    """Rewrites summary.md (and the PNGs) from every suite's results in `out`."""
    from nanokv.eval.results import ResultStore
    from nanokv.eval.summary import write_summary

    rows = {suite: ResultStore(out, suite).rows() for suite in SUITES}
    summary = write_summary(out, rows)
    print(f"results: {out}/*.jsonl\nsummary: {summary}", file=sys.stderr)
    if not no_plots:
        from nanokv.eval.plots import write_plots

        written = write_plots(out, rows)
        print(f"plots: {len(written)} PNGs in {out}", file=sys.stderr)
    print(summary.read_text())
    return 0
