"""kvpress on nanokv's own needle-in-a-haystack cases: the reference for the context-only setting.

What: builds the NIAH cases that `nanokv eval niah` builds (same ids, same documents, questions
and answer prefixes, made with nanokv's tokenizer) and answers them with NVIDIA's kvpress
pipeline in its native setting: the document is compressed before the question is known, then
the question, the template's tail and the answer prefix follow, greedy, `max_new_tokens` 12,
the answer cut at its first newline (what the eval's stop string does). One JSON line a case and
press, then one summary line a (press, budget): hits / cases.

Why: issue 9 asks whether nanokv's query-agnostic scoring beats KVzip on the same cases; only
the same cases make that a comparison. kvpress is a bench-only extra, never a dependency of the
engine: it pins an older transformers, so run this from its own venv with nanokv on the path:

    python3 -m venv /tmp/kvpenv && /tmp/kvpenv/bin/pip install torch==2.13.0 kvpress==0.5.5
    PYTHONPATH=. /tmp/kvpenv/bin/python bench/kvpress_niah.py --lengths 2048 \
        --depths 0 0.25 0.5 0.75 1 --seeds 0 1 --budgets 0.05 0.1 --out kvpress.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import product
from pathlib import Path

import torch

from nanokv.default_model import default_model_dir
from nanokv.eval.niah import NiahSpec, make_case, score
from nanokv.tokenizer import Tokenizer

NEW_TOKENS = 12  # the eval's NEW_TOKENS["single"]
PRESSES = ("kvzip", "kvzip_plus", "snapkv", "none")


def make_press(name: str, budget: float):
    """The kvpress press `name` keeping `budget` of the context (compression_ratio = 1 - it)."""
    from kvpress import KVzipPress, SnapKVPress

    ratio = 1.0 - budget
    if name == "kvzip":
        return KVzipPress(compression_ratio=ratio)
    if name == "kvzip_plus":
        return KVzipPress(compression_ratio=ratio, kvzip_plus_normalization=True)
    if name == "snapkv":
        return SnapKVPress(compression_ratio=ratio)
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the default model")
    parser.add_argument("--task", default="single")
    parser.add_argument("--filler", default="prose")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--depths", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--presses", nargs="+", choices=PRESSES, default=["kvzip", "none"])
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    from transformers import pipeline

    model_dir = args.model or default_model_dir()
    tokenizer = Tokenizer(model_dir)
    pipe = pipeline(
        "kv-press-text-generation", model=str(model_dir), device="cpu", dtype=torch.float32
    )
    out = args.out.open("w") if args.out else None
    totals: dict[tuple[str, float], list[int]] = {}
    for length, depth, seed in product(args.lengths, args.depths, args.seeds):
        spec = NiahSpec(args.task, args.filler, length, depth, seed)
        case = make_case(spec, tokenizer)
        for press_name, budget in product(args.presses, args.budgets):
            if press_name == "none" and budget != args.budgets[0]:
                continue
            kept = 1.0 if press_name == "none" else budget
            began = time.perf_counter()
            answer = pipe(
                case.document, question=case.question, answer_prefix=case.answer_prefix,
                press=make_press(press_name, kept), max_new_tokens=NEW_TOKENS,
            )["answer"].split("\n")[0]  # fmt: skip
            correct = score(answer, case.expected) == 1.0
            row = {
                "case": spec.id, "press": press_name, "budget": kept, "length": length,
                "answer": answer, "expected": list(case.expected), "correct": correct,
                "seconds": round(time.perf_counter() - began, 2),
            }  # fmt: skip
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
            totals.setdefault((press_name, kept), []).append(int(correct))
    for (press_name, kept), hits in totals.items():
        summary = {"press": press_name, "budget": kept, "hits": sum(hits), "cases": len(hits)}
        print(json.dumps({"summary": summary}), flush=True)
        if out:
            out.write(json.dumps({"summary": summary}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
