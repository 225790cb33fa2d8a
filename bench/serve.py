"""Serving benchmark: at one fixed KV memory, how many requests each policy runs at once and how
many tokens a second the server puts out.

What: `nanokv serve` in this process (uvicorn on 127.0.0.1, the real HTTP path), its KV pool
sized to hold `--conversations` full-cache requests of `--prompt-tokens` + `--max-tokens`
tokens. For each cell of `--cells` (`full`, `NAME@BUDGET`), `--requests` streaming completions
with distinct prompts of exactly `--prompt-tokens` tokens (real text that ships with Python)
are sent at once by async `openai` clients, with the cell's `kv_policy` / `kv_budget` in the
body and `ignore_eos` so that every request decodes `--max-tokens` tokens; the server's `/stats`
gives the peaks. One JSON line per cell: how many of its requests the pool holds at once (its
bytes over a request's decode-time pages), the most requests admitted at once (holding pool
memory: admitted, prefilling or running), the most running, output tokens a second over the
cell's wall time, p50/p99 time to first token and inter-token latency, the pool's peak use;
then one line of
bytes (`--bytes-tokens`: one prompt that long, each policy cell's arena as the server holds it
vs the full cache's); then a summary with the ratios to the full cache and issue 10's targets.

Why: the payoff of eviction in serving is concurrency at a fixed memory, and batched decode
costs about one sequence's weight reads. Ratios measured in one run on one machine only.

    python bench/serve.py                                         # 4k prompts (tens of minutes)
    python bench/serve.py --prompt-tokens 512 --max-tokens 64 --requests 8   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import openai
import torch

import nanokv
from nanokv.eval.corpus import docs_text
from nanokv.sampling import SamplingParams
from nanokv.scheduler import PREFILL_SHARE
from nanokv.sequence import Request
from nanokv.serve.server import start_server

DEFAULT_CELLS = ("full", "laprox@0.05", "snapkv@0.05")
TARGET_CONCURRENCY, TARGET_THROUGHPUT, TARGET_BYTES = 10.0, 3.0, 0.07


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF-layout model dir (default: SmolLM2-135M)")
    p.add_argument("--dtype", default=None, help="auto (default), float32, bfloat16")
    p.add_argument("--cells", nargs="+", default=list(DEFAULT_CELLS), help="full or NAME@BUDGET")
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=256, help="decoded by every request")
    p.add_argument("--requests", type=int, default=48, help="sent at once, per cell")
    p.add_argument("--conversations", type=int, default=4, help="full requests the pool holds")
    p.add_argument("--bytes-tokens", type=int, default=8128, help="0 skips the bytes line")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds a cell may take")
    p.add_argument("--min-cache", type=int, default=None, help="cache floor (default: LLM's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--prefill-share", type=float, default=PREFILL_SHARE,
        help="the scheduler's share of time for prefills while a batch decodes",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    args = p.parse_args(argv)
    if not 0 <= args.prefill_share < 1:
        p.error(f"--prefill-share must be in [0, 1), got {args.prefill_share}")
    args.cells = [parse_cell(text) for text in args.cells]
    return args


def parse_cell(text: str) -> tuple[str, float | None]:
    """'full' -> ('full', None); 'laprox@0.05' -> ('laprox', 0.05)."""
    name, _, budget = text.partition("@")
    if name == "full" and not budget:
        return name, None
    try:
        return name, float(budget)
    except ValueError:
        sys.exit(f"serve.py: error: cell {text!r}: write full or NAME@BUDGET (laprox@0.05)")


def label(cell: tuple[str, float | None]) -> str:
    return cell[0] if cell[1] is None else f"{cell[0]}@{cell[1]:g}"


def prompts(llm: nanokv.LLM, count: int, length: int) -> list[list[int]]:
    """`count` distinct token prompts of exactly `length` tokens of the Python reference manual
    (it ships with Python), each starting at its own offset."""
    stream = llm.tokenizer.encode(docs_text().text, add_special_tokens=False)
    if len(stream) < length + count:
        sys.exit(f"serve.py: error: the text has {len(stream)} tokens, too few for the prompts")
    stride = max(1, (len(stream) - length) // count)
    return [stream[i * stride : i * stride + length] for i in range(count)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: list[int], body: dict):
    """Streams one completion; returns (seconds to first token, gaps between tokens, tokens)."""
    began = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    stream = await client.completions.create(
        model=model, prompt=prompt, stream=True, stream_options={"include_usage": True}, **body
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    first = stamps[0] - began if stamps else None
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return first, gaps, tokens


async def run_cell(server, model: str, cell, batch: list[list[int]], args) -> dict:
    """Sends every prompt at once with the cell's KV settings; measures the cell."""
    name, budget = cell
    extra = {} if name == "full" else {"kv_policy": name, "kv_budget": budget}
    body = {
        "max_tokens": args.max_tokens, "temperature": 0.0,
        "extra_body": {"ignore_eos": True, **extra},
    }  # fmt: skip
    client = openai.AsyncOpenAI(
        base_url=server.base_url, api_key="none", max_retries=0, timeout=args.timeout
    )
    server.scheduler.reset_peaks()
    began = time.perf_counter()
    results = await asyncio.wait_for(
        asyncio.gather(*(one_request(client, model, prompt, body) for prompt in batch)),
        args.timeout,
    )
    wall = time.perf_counter() - began
    await client.close()
    probe = Request(batch[0], SamplingParams(max_new_tokens=args.max_tokens), *cell)
    if name == "full":
        probe.policy, probe.budget = "full", 1.0
    _, (_, steady_bytes) = server.scheduler.reservation(probe)
    async with httpx.AsyncClient(timeout=30) as http:  # the server's own /stats
        stats = (await http.get(f"{server.url}/stats")).json()
    firsts = [first for first, _, _ in results if first is not None]
    gaps = [gap for _, request_gaps, _ in results for gap in request_gaps]
    tokens = sum(count for _, _, count in results)
    return {
        "bench": "serve", "cell": label(cell), "requests": len(batch),
        "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
        "pool_holds": server.pool.capacity_bytes // steady_bytes,
        "peak_admitted": stats["peak_admitted"], "peak_running": stats["peak_running"],
        "peak_pool_use": round(stats["pool_peak_use"], 4), "output_tokens": tokens,
        "wall_s": round(wall, 2), "output_tok_s": round(tokens / wall, 2),
        "ttft_p50_ms": percentile(firsts, 0.5), "ttft_p99_ms": percentile(firsts, 0.99),
        "itl_p50_ms": percentile(gaps, 0.5), "itl_p99_ms": percentile(gaps, 0.99),
    }  # fmt: skip


def bytes_line(server, cells, length: int, max_tokens: int) -> dict:
    """Each policy cell's arena, as the server's engines hold it after the prefill of one
    prompt of `length` tokens (every byte: K, V and the policy's slot statistics), as a
    fraction of the full cache's arena for the prompt and its new tokens."""
    llm = server.llm
    (prompt,) = prompts(llm, 1, length)
    new_tokens = max(1, min(max_tokens, llm.config.max_position_embeddings - length))
    full = server.scheduler.engine_for("full", 1.0).arena_bytes(length + new_tokens)
    fractions = {}
    for cell in cells:
        if cell[0] != "full":
            state, _ = server.scheduler.engine_for(*cell).start([prompt], new_tokens)
            fractions[label(cell)] = round(state.arena.nbytes / full, 4)
    return {"bench": "serve-bytes", "prompt_tokens": length, "arena_vs_full": fractions}


def summary(rows: list[dict], size: dict | None) -> dict:
    full = next((row for row in rows if row["cell"] == "full"), None)
    line: dict = {"bench": "serve-summary"}
    if full is not None:
        for row in rows:
            if row is full:
                continue
            line[row["cell"]] = {
                "pool_holds_vs_full": round(row["pool_holds"] / max(full["pool_holds"], 1), 2),
                "admitted_vs_full": round(row["peak_admitted"] / max(full["peak_admitted"], 1), 2),
                "tok_s_vs_full": round(row["output_tok_s"] / full["output_tok_s"], 2),
            }
    targets = {
        f"{cell} admits >= {TARGET_CONCURRENCY:g}x and >= {TARGET_THROUGHPUT:g}x tok/s": (
            ratios["admitted_vs_full"] >= TARGET_CONCURRENCY
            and ratios["tok_s_vs_full"] >= TARGET_THROUGHPUT
        )
        for cell, ratios in line.items()
        if isinstance(ratios, dict)
    }
    if size is not None:
        for cell, fraction in size["arena_vs_full"].items():
            targets[f"{cell} holds <= {TARGET_BYTES:.0%} of the full cache"] = (
                fraction <= TARGET_BYTES
            )
    line["targets"] = targets
    return line


def emit(line: dict, out: Path | None) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if out is not None:
        with out.open("a") as handle:
            handle.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    floor = {} if args.min_cache is None else {"min_cache": args.min_cache}
    llm = nanokv.LLM(args.model, dtype=args.dtype, **floor)
    total = args.prompt_tokens + args.max_tokens
    if total > llm.config.max_position_embeddings:
        sys.exit("serve.py: error: prompt + max tokens exceed the model's context")
    one_full = llm.engine.arena_bytes(-(-total // 16) * 16)
    batch = prompts(llm, args.requests, args.prompt_tokens)
    meta = {"model": llm.model_dir.name, "dtype": str(llm.dtype).removeprefix("torch.")}
    meta |= {"kv_memory_bytes": args.conversations * one_full, "threads": torch.get_num_threads()}
    meta |= {"prefill_share": args.prefill_share}
    rows = []
    with start_server(
        llm, kv_memory_bytes=args.conversations * one_full, max_waiting=args.requests,
        prefill_share=args.prefill_share,
    ) as server:  # fmt: skip
        model = llm.model_dir.name
        for cell in args.cells:
            rows.append(asyncio.run(run_cell(server, model, cell, batch, args)))
            emit({**rows[-1], **meta}, args.out)
        size = None
        if args.bytes_tokens:
            size = bytes_line(server, args.cells, args.bytes_tokens, args.max_tokens)
            emit({**size, **meta}, args.out)
    emit({**summary(rows, size), **meta}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
