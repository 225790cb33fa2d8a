"""Policy benchmark: what each eviction policy costs and saves against the full cache.

What: for each prompt length (default 2048 / 4096 / 8192 tokens of real text, batch 1) and each
policy at one budget (default 0.05), nanokv prefills, evicts and decodes greedily; one JSON line
per (length, policy) gives prefill ms, the eviction time and its share of prefill, decode tok/s,
arena bytes, and the ratios to the full cache measured in the same run; a summary line closes.

Why: the point of eviction is memory and decode speed at equal quality; the quality side is
`nanokv eval`, this is the cost side (STYLE.md #10: ratios from one run on one machine).

    python bench/policies.py                        # default model, 2k 4k 8k (8064 + 64 new), 5%
    python bench/policies.py --lengths 512 --new-tokens 8 --policies full snapkv   # quick check
    python bench/policies.py --policies full laprox laprox:observe=repeat --new-tokens 8
                                                    # the cost of KVzip's probe in prefill

A policy is an eval spec (`NAME[:key=value,...]`, see docs/eval.md), so any option is one flag
away; a policy that observes "repeat" runs KVzip's probe (nanokv/probe.py) in its prefill.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from e2e import copy_bandwidth_gb_s, emit, machine_info, stdlib_token_stream, sync

import nanokv
from nanokv.eval.specs import PolicySpec, parse_spec

POLICIES = ("full", "streaming", "h2o", "snapkv", "tova", "auv", "laprox", "quest", "laprox+quest")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF-layout model dir (default: SmolLM2-135M)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8064])
    p.add_argument("--policies", nargs="+", default=list(POLICIES))
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument(
        "--min-cache", type=int, default=0,
        help="cache floor in tokens (default 0: the budget is exact at every length)",
    )  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    return p.parse_args(argv)


def run_policy(llm: nanokv.LLM, prompt: list[int], new_tokens: int) -> dict:
    """One prefill + greedy decode under the LLM's current policy."""
    engine, device = llm.engine, llm.device
    probes = engine.probes(llm.tokenizer, [prompt])
    sync(device)
    start = time.perf_counter()
    state, logits = engine.start([prompt], new_tokens, probes=probes)
    sync(device)
    prefill = time.perf_counter() - start
    eviction_at_prefill = engine.eviction.seconds
    tokens = logits.argmax(-1)
    for _ in range(new_tokens - 1):
        tokens = engine.step(state, tokens).argmax(-1)
    sync(device)
    decode = time.perf_counter() - start - prefill
    kept = state.kept_after_prefill.float()
    return {
        "prefill_ms": round(prefill * 1e3, 1),
        "eviction_ms": round(eviction_at_prefill * 1e3, 1),
        "eviction_share_of_prefill": round(eviction_at_prefill / prefill, 4),
        "decode_eviction_ms": round((engine.eviction.seconds - eviction_at_prefill) * 1e3, 1),
        "decode_tok_s": round((new_tokens - 1) / decode, 2),
        "arena_bytes": state.arena.nbytes,
        "kept_per_head_mean": round(float(kept.mean()), 1),
        "kept_per_head_min": int(kept.min()),
        "kept_per_head_max": int(kept.max()),
    }


def configure(llm: nanokv.LLM, spec: PolicySpec, budget: float) -> None:
    llm.configure(spec.policy, budget=1.0 if spec.is_full else budget, **spec.quest, **spec.options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    llm = nanokv.LLM(args.model, dtype=args.dtype, device=args.device, min_cache=args.min_cache)
    if max(args.lengths) + args.new_tokens > llm.config.max_position_embeddings:
        sys.exit("policies.py: error: prompt + new tokens exceed the model's context")
    stream = stdlib_token_stream(llm.tokenizer.encode, max(args.lengths), args.seed)
    specs = [parse_spec(text) for text in args.policies]  # a bad spec fails before any run
    configure(llm, specs[0], args.budget)
    run_policy(llm, stream[:64], 4)  # warm-up
    meta = {
        "model": str(llm.model_dir), "dtype": args.dtype, "budget": args.budget,
        "new_tokens": args.new_tokens, "machine": machine_info(torch.device(args.device)),
    }  # fmt: skip
    sink, lines = [], []
    for n in args.lengths:
        results = {}
        for spec in specs:
            configure(llm, spec, args.budget)
            results[spec.label] = run_policy(llm, stream[:n], args.new_tokens)
        full = results.get("full")
        for policy, result in results.items():
            if full is not None:
                result["decode_speedup_vs_full"] = round(
                    result["decode_tok_s"] / full["decode_tok_s"], 3
                )
                result["arena_vs_full"] = round(result["arena_bytes"] / full["arena_bytes"], 4)
            lines.append({"bench": "policies", "prompt_tokens": n, "policy": policy, **result})
            emit({**lines[-1], **meta}, sink)
    bandwidth = copy_bandwidth_gb_s(torch.device(args.device))
    emit({"bench": "policies-summary", "copy_bandwidth_gb_s": round(bandwidth, 2), **meta}, sink)
    if args.out is not None:
        args.out.resolve().write_text("\n".join(sink) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
