"""Chat benchmark: what a conversation's recompression costs a turn, as the conversation grows.

What: one scripted conversation per policy (default `full` and `laprox` at 10% with the cache
floor of 128, what `nanokv chat --budget 0.1` runs): each turn asks for a one-sentence summary
of a new passage of prose (`--turn-tokens` tokens) and the model answers greedily (exactly
`--max-new-tokens` tokens: EOS ignored), in one arena through `Conversation`. One JSON line per
(policy, turn) gives the tokens seen, the slots a head holds, the turn's wall time and the part
of it spent compressing (KVzip's probe against the arena and the selection: the engine's
eviction seconds), and for a compressed policy the ratio of its turn time to the full cache's
at the same turn; a summary line per policy closes.

Why: a conversation is compressed after every answer before the next question is known, so its
probe runs once a turn. Repeating every token seen would make each recompression a pass over the
whole conversation, growing with it; the probe repeats what the arena still holds
(nanokv/conversation.py), so a turn's compression stays about the size of the budget and the
latest turn. This measures it (STYLE.md #10: ratios from one run on one machine).

    python bench/chat.py                               # default model, 16 turns of 256 tokens
    python bench/chat.py --turns 4 --turn-tokens 64    # quick check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from e2e import emit, machine_info
from policies import configure

import nanokv
from nanokv.eval.haystack import build_haystack, filler_stream
from nanokv.eval.specs import parse_spec
from nanokv.eval.tokens import counter
from nanokv.sampling import SamplingParams

TASK = "Summarise the following text in one sentence."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF-layout model dir (default: SmolLM2-135M)")
    p.add_argument("--policies", nargs="+", default=["full", "laprox"])
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--min-cache", type=int, default=128, help="cache floor in tokens")
    p.add_argument("--turns", type=int, default=16)
    p.add_argument("--turn-tokens", type=int, default=256, help="tokens of prose a turn")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens of each answer")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="where the passages start")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    return p.parse_args(argv)


def script(llm: nanokv.LLM, turns: int, turn_tokens: int, seed: int) -> list[str]:
    """The user turns: a summary task on the next passage of installed prose, each."""
    stream, count = filler_stream("prose", seed), counter(llm.tokenizer)
    return [
        f"{TASK}\n\n{build_haystack(stream, turn_tokens, [], count).text}" for _ in range(turns)
    ]


def converse(llm: nanokv.LLM, turns: list[str], max_new_tokens: int) -> list[dict]:
    """Runs the turns in a new conversation under the LLM's policy; a dict a turn."""
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    conversation = llm.conversation(params)
    eviction = llm.compress_engine.eviction
    rows = []
    for turn, text in enumerate(turns, start=1):
        before, start = eviction.seconds, time.perf_counter()
        conversation.send(text)
        seconds = time.perf_counter() - start
        stats = conversation.stats()
        rows.append({
            "turn": turn, "tokens_seen": stats.tokens_seen, "kept_per_head": stats.kept_mean,
            "turn_s": round(seconds, 3), "compress_s": round(eviction.seconds - before, 3),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    llm = nanokv.LLM(args.model, dtype=args.dtype, min_cache=args.min_cache)
    specs = [parse_spec(text) for text in args.policies]  # a bad spec fails before any run
    turns = script(llm, args.turns, args.turn_tokens, args.seed)
    meta = {
        "model": str(llm.model_dir), "dtype": args.dtype, "budget": args.budget,
        "min_cache": args.min_cache, "max_new_tokens": args.max_new_tokens,
        "machine": machine_info(torch.device("cpu")),
    }  # fmt: skip
    configure(llm, specs[0], args.budget)
    converse(llm, turns[:1], 4)  # warm-up
    results, sink = {}, []
    for spec in specs:
        configure(llm, spec, args.budget)
        results[spec.label] = converse(llm, turns, args.max_new_tokens)
    full = results.get("full")
    for label, rows in results.items():
        for index, row in enumerate(rows):
            if full is not None and label != "full":
                row["turn_vs_full"] = round(row["turn_s"] / full[index]["turn_s"], 3)
            emit({"bench": "chat", "policy": label, **row, **meta}, sink)
        emit({"bench": "chat-summary", "policy": label, **summary(rows), **meta}, sink)
    if args.out is not None:
        args.out.resolve().write_text("\n".join(sink) + "\n")
    return 0


def summary(rows: list[dict]) -> dict:
    """The conversation's totals and its last turn's share of compression."""
    total, compress = sum(r["turn_s"] for r in rows), sum(r["compress_s"] for r in rows)
    last = rows[-1]
    return {
        "turns": len(rows), "tokens_seen": last["tokens_seen"], "total_s": round(total, 2),
        "compress_s": round(compress, 2), "compress_share": round(compress / total, 4),
        "last_turn_s": last["turn_s"], "last_compress_s": last["compress_s"],
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
