"""`nanokv generate | chat | serve | eval | bench | convert`: the command line. Bad input gets
one line and exit status 2 (in `chat`, a bad turn gets one line and the chat goes on)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from nanokv.budget import Budget
from nanokv.eval.cli import add_eval_parser
from nanokv.kernels import cpu_attention
from nanokv.policies import DEFAULT_POLICY, parse_policy, policy_for_budget, policy_names
from nanokv.policies.allocation import ALLOCATIONS
from nanokv.policies.base import OBSERVATIONS, REPEAT_SENTENCES
from nanokv.sampling import SamplingParams
from nanokv.scheduler import PREFILL_SHARE

if TYPE_CHECKING:
    from nanokv.conversation import Conversation
    from nanokv.llm import LLM

EXIT_BAD_INPUT = 2
# bench/<script>.py of each benchmark: a script named like an installed module would shadow it
# when bench/ is on the path (transformers >= 5.25 imports the PyPI package `kernels`)
BENCH_SCRIPTS = {
    "kernels": "attention_kernels",
    "e2e": "e2e",
    "policies": "policies",
    "chat": "chat",
}
BENCHMARKS = tuple(BENCH_SCRIPTS)


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
    chat = commands.add_parser(
        "chat", help="a multi-turn chat in one compressed arena (a turn a line of stdin)"
    )
    _add_chat(chat)
    _add_serve(commands.add_parser("serve", help="an OpenAI-compatible HTTP server"))
    add_eval_parser(commands)
    bench = commands.add_parser("bench", help="run a benchmark script from bench/")
    bench.add_argument("name", choices=BENCHMARKS, help=", ".join(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    bench.set_defaults(run=_run_bench)
    convert = commands.add_parser("convert", help="convert the embedded default model")
    convert.add_argument("--out", type=Path, help="output directory (default: weights/...)")
    convert.add_argument("--force", action="store_true", help="convert even if it exists")
    convert.set_defaults(run=_run_convert)
    return parser


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", help="one or more prompts (a batch); '-' reads stdin")
    _add_model_options(p)
    p.add_argument(
        "--document", metavar="PATH",
        help="a file whose text goes before every prompt, a blank line between ('-' reads stdin)",
    )  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="report what was kept, to stderr")
    _add_sampling_options(p)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.set_defaults(run=_run_generate)


def _add_chat(p: argparse.ArgumentParser) -> None:
    _add_model_options(p)
    _add_sampling_options(p)
    p.set_defaults(run=_run_chat)


def _add_serve(p: argparse.ArgumentParser) -> None:
    """The model options, then where to listen, how much KV memory, and who may call."""
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    memory = p.add_mutually_exclusive_group()
    memory.add_argument(
        "--kv-memory", default="1GiB", metavar="SIZE",
        help="the KV pool all requests share, e.g. 1GiB (default) or 512MiB",
    )  # fmt: skip
    memory.add_argument(
        "--max-kv-tokens", type=int, metavar="N", help="size the KV pool to N tokens of full cache"
    )
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/ routes")
    p.add_argument(
        "--max-waiting", type=int, default=64, metavar="N",
        help="requests that may wait for KV memory; more get 503 (default 64)",
    )  # fmt: skip
    p.add_argument("--max-body", default="1MiB", metavar="SIZE", help="request body limit")
    p.add_argument(
        "--prefill-share", type=float, default=PREFILL_SHARE, metavar="F",
        help="share of time queued prompts' prefills get while a batch decodes, in [0, 1): "
        "higher for throughput and time to first token, lower for smooth streams (default "
        f"{PREFILL_SHARE})",
    )  # fmt: skip
    p.set_defaults(run=_run_serve)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """The model, its policy and budget: what `generate`, `chat` and `serve` share."""
    p.add_argument("--model", help="HF-layout model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument(
        "--policy",
        help=f"eviction policy: {policy_names()} (default: full, or {DEFAULT_POLICY} when "
        "--budget is below 1)",
    )  # fmt: skip
    p.add_argument("--budget", default="1.0", help="KV budget: fraction in (0,1] or token count")
    p.add_argument(
        "--min-cache", type=int, metavar="N",
        help="cache floor in tokens: no head keeps fewer, a prompt+answer that fits is never "
        "evicted (default 128; 0 = exact budget)",
    )  # fmt: skip
    p.add_argument("--allocation", choices=ALLOCATIONS, help="budget split across heads/layers")
    p.add_argument("--min-head-share", type=float, help="layer/global: per-head floor (0-1)")
    p.add_argument(
        "--max-head-share", type=float,
        help="layer/global: per-head cap, a multiple of the mean >= 1 (default 4; 20 with "
        "--observe repeat)",
    )  # fmt: skip
    p.add_argument("--sinks", type=int, help="attention sinks always kept (default 4)")
    p.add_argument("--window", type=int, help="observation window, kept (default 32)")
    p.add_argument(
        "--observe", choices=OBSERVATIONS,
        help="snapkv/laprox/tova: score with the last prompt queries (default) or with KVzip's "
        "probe, the document repeated after it (query-agnostic)",
    )  # fmt: skip
    p.add_argument(
        "--information", action=argparse.BooleanOptionalAction,
        help="global/layerwise: weigh each token's score by its self-information "
        "-log p(x_j | x_<j) at the model-wide cut (default off)",
    )  # fmt: skip
    p.add_argument(
        "--sentences", type=float, metavar="SHARE",
        help="global/layerwise with KVzip's probe: share of the mean head budget kept as whole "
        f"sentences in every head, in [0, 1) (default {REPEAT_SENTENCES} there, 0 = off); in a "
        "conversation, the share of whole turns in its turn memory",
    )  # fmt: skip
    p.add_argument("--pool", type=int, help="max-pool kernel along tokens (odd)")
    p.add_argument("--chunk", type=int, help="keep whole chunks of C tokens (default 1)")
    p.add_argument("--decode-window", type=int, help="W: slots freed per eviction (default 16)")
    p.add_argument("--quest-budget", type=float, help="Quest read budget (fraction or tokens)")
    p.add_argument("--quest-oracle", action="store_true", help="rank pages by true attention")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="auto (default): bf16 where the CPU or GPU does bf16 natively, else fp32",
    )  # fmt: skip
    p.add_argument(
        "--kv-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="the KV cache's dtype: auto (default) is the model's; bfloat16 under fp32 weights "
        "holds the cache in half the bytes",
    )  # fmt: skip
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    """How answers are sampled: what `generate` and `chat` share."""
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _run_generate(args: argparse.Namespace) -> int:
    """`nanokv generate`: checks the cheap inputs before loading the model, then streams the
    answer. The policy name is parsed by `parse_policy`, the one parser LLM uses too."""
    prompts = _prompts(args.prompts, args.document)
    llm = _load_llm(args, _budget(args))
    use_chat = not args.raw and llm.tokenizer.chat_template is not None
    _print_outputs(llm.chat if use_chat else llm.generate, prompts, _sampling_params(args))
    if args.verbose:
        print(llm.last_report.summary(), file=sys.stderr)
        dtype, kv_dtype = (str(d).removeprefix("torch.") for d in (llm.dtype, llm.kv_dtype))
        print(f"dtype: {dtype} ({llm.dtype_reason}); KV cache: {kv_dtype}", file=sys.stderr)
        if llm.device.type == "cpu":
            print(f"decode attention: {cpu_attention.backend()}", file=sys.stderr)
            print(f"weights: {llm.model.layout.name}", file=sys.stderr)  # c-blocked: C GEMVs
    return 0


def _budget(args: argparse.Namespace) -> Budget:
    """--budget, checked against --policy before the model loads; an unset --policy becomes
    the one the budget runs (`policy_for_budget`)."""
    budget = Budget.parse(args.budget)
    if args.policy is not None:
        parse_policy(args.policy)  # an unknown name says so itself
    try:
        args.policy = policy_for_budget(args.policy, budget.value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return budget


def _prompts(texts: list[str], document: str | None) -> list[str]:
    """The prompts to run ('-' reads stdin), each after the document when one is given."""
    if document == "-" and "-" in texts:
        raise UsageError("stdin can feed --document or a prompt, not both: give the other inline")
    prompts = [sys.stdin.read() if p == "-" else p for p in texts]
    if any(not p.strip() for p in prompts):
        raise UsageError("a prompt is empty: give the text to complete")
    if document is None:
        return prompts
    text = _read_document(document)
    return [f"{text}\n\n{prompt}" for prompt in prompts]


def _read_document(path: str) -> str:
    """The text of --document PATH ('-' is stdin), trailing whitespace dropped: the blank line
    that parts it from the question is added by the caller."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--document {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UsageError(f"--document {path}: cannot read it: {reason}") from None
    if not text.strip():
        raise UsageError(f"--document {path} is empty: give a document to ask about")
    return text.rstrip()


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    """How to pick tokens, from the command line (greedy unless --temperature is set)."""
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=args.stop,
    )  # fmt: skip


def _load_llm(args: argparse.Namespace, budget: Budget) -> LLM:
    """The model with the policy options given on the command line; unset ones keep the LLM's
    and the policy's defaults. The budget goes as a number so that it takes the cache floor."""
    from nanokv.llm import LLM

    options = dict(
        min_cache=args.min_cache, sinks=args.sinks, observation_window=args.window,
        pool=args.pool, chunk=args.chunk, decode_window=args.decode_window,
        allocation=args.allocation, min_head_share=args.min_head_share,
        max_head_share=args.max_head_share, observe=args.observe, information=args.information,
        sentences=args.sentences,
    )  # fmt: skip
    return LLM(
        args.model, policy=args.policy, budget=budget.value, dtype=args.dtype,
        kv_dtype=args.kv_dtype, device=args.device, quest_budget=args.quest_budget,
        quest_oracle=args.quest_oracle,
        **{name: value for name, value in options.items() if value is not None},
    )  # fmt: skip


def _print_outputs(run: Callable, prompts: list[str], params: SamplingParams) -> None:
    """Streams the answer to one prompt as it is generated; a batch prints each in turn."""
    if len(prompts) == 1:
        run(prompts, params, on_text=lambda _, text: print(text, end="", flush=True))
        print()
        return
    for index, output in enumerate(run(prompts, params)):
        print(f"--- [{index}] ---\n{output.text}")


def _run_serve(args: argparse.Namespace) -> int:
    """`nanokv serve`: checks every flag before the model loads, then serves until Ctrl-C."""
    from nanokv.pool import parse_size
    from nanokv.serve.server import ServeOptions, run_server

    budget = _budget(args)
    if parse_policy(args.policy)[1]:
        raise UsageError(f"--policy {args.policy}: Quest is not served; choose an eviction policy")
    options = ServeOptions(
        model_name=_model_name(args.model), host=args.host, port=args.port,
        kv_memory_bytes=parse_size(args.kv_memory), max_kv_tokens=args.max_kv_tokens,
        api_key=args.api_key, max_waiting=args.max_waiting,
        max_body_bytes=parse_size(args.max_body), prefill_share=args.prefill_share,
    )  # fmt: skip
    return run_server(options, lambda: _load_llm(args, budget))


def _model_name(model: str | None) -> str:
    """The name the server answers to: the model directory's name."""
    if model is None:
        from nanokv.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return Path(model).expanduser().resolve().name


def _run_chat(args: argparse.Namespace) -> int:
    """`nanokv chat`: one conversation in one arena (nanokv/conversation.py), a turn a line;
    /stats, /reset, /exit (or end of input). A bad turn gets one line and the chat goes on."""
    llm = _load_llm(args, _budget(args))
    conversation = llm.conversation(_sampling_params(args))
    if sys.stdin.isatty():
        print("nanokv chat: a turn a line; /stats, /reset, /exit", file=sys.stderr)
    for line in _chat_lines():
        command = line.strip()
        if command == "/exit":
            break
        if command == "/stats":
            print(conversation.stats().line(), flush=True)
        elif command == "/reset":
            conversation.reset()
            print("nanokv: a new conversation", file=sys.stderr)
        else:
            _chat_turn(conversation, line)
    return 0


def _chat_lines() -> Iterator[str]:
    """The turns: typed after a `> ` prompt on a terminal, else stdin's lines, until EOF."""
    if not sys.stdin.isatty():
        yield from (line.rstrip("\r\n") for line in sys.stdin)
        return
    while True:
        try:
            yield input("> ")
        except EOFError:
            print()
            return


def _chat_turn(conversation: Conversation, text: str) -> None:
    """Streams the answer to one turn; Ctrl-C stops it and the chat goes on."""
    from nanokv.engine import InputError

    stop = threading.Event()

    def show(piece: str) -> None:
        print(piece, end="", flush=True)
        if stop.is_set():
            raise KeyboardInterrupt  # between two decode steps: the conversation keeps it

    try:
        with _ctrl_c_sets(stop):
            output = conversation.send(text, on_text=show)
    except InputError as exc:
        print(f"nanokv: error: {_one_line(exc)}", file=sys.stderr)
        return
    print(flush=True)
    if output.finish_reason == "interrupted":
        print("nanokv: answer stopped; the conversation goes on", file=sys.stderr)


@contextlib.contextmanager
def _ctrl_c_sets(stop: threading.Event) -> Iterator[None]:
    """While an answer is written, Ctrl-C sets `stop` instead of raising wherever it lands, so
    that the stream raises it at the next piece of text, never half-way through a step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_bench(args: argparse.Namespace) -> int:
    """Runs the benchmark's script in bench/ of the source checkout with the remaining
    arguments."""
    import runpy

    script = Path(__file__).resolve().parent.parent / "bench" / f"{BENCH_SCRIPTS[args.name]}.py"
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
