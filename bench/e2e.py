"""End-to-end benchmark: prefill latency and greedy decode throughput, nanokv vs transformers.

What: for each prompt length (default 512 / 2048 / 4096 tokens of real text, batch 1) both engines
prefill the same token ids and then decode the same number of new tokens greedily; the script
prints one JSON line per length (prefill ms, decode tok/s, achieved GB/s, peak memory, K/V bytes,
how many greedy tokens agree) and a final summary line, with the ratios nanokv / transformers
measured in the same process on the same machine.

Why: nanokv's full-cache path must cost no more than the reference implementation it is checked
against before its eviction policies are worth comparing; a ratio measured in one run, on one
machine, is the only speed claim that survives a noisy shared box (STYLE.md #10).

Timing: seeded, one warm-up per engine, ``time.perf_counter`` after a device sync.
- nanokv: prefill = ``engine.start`` (arena allocation + layer-major chunked prefill); decode =
  ``new_tokens - 1`` calls of ``engine.step`` fed with the argmax.
- transformers: prefill = one forward with ``use_cache=True`` and ``logits_to_keep=1`` (the same
  work as nanokv: only the last token's logits); decode = a manual greedy loop feeding one token at
  a time with ``past_key_values`` (a DynamicCache), i.e. what ``generate`` does without its
  logits-processor and stopping overhead.
The first new token comes from the prefill logits, so decode tok/s = (new_tokens - 1) / decode s.
Decode GB/s counts the bytes a step must read: the weights plus the K/V of the context (halfway
through decoding), the same formula for both engines.

    python bench/e2e.py                                   # default model, 512 2048 4096
    python bench/e2e.py --lengths 128 --new-tokens 8      # quick check
    python bench/e2e.py --engines nanokv --device cuda --dtype bfloat16 --out e2e.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import random
import resource
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import nanokv
from nanokv.config import ModelConfig
from nanokv.kernels.decode_attention import triton_available
from nanokv.llm import DTYPES

ENGINES = ("nanokv", "transformers")
HF_DECODE_METHOD = "manual greedy loop, one token per forward, DynamicCache past_key_values"
WARMUP_TOKENS, WARMUP_NEW = 32, 4
RATIOS = ("prefill_ms", "decode_tok_s", "prefill_ms_best", "decode_tok_s_best")  # nanokv / hf


@dataclass
class Timed:
    """One prefill + greedy decode, as an engine's run function returns it."""

    prefill_s: float
    decode_s: float
    tokens: list[torch.Tensor]  # new_tokens tensors of shape (1,)
    kv_bytes: int


@dataclass
class Run:
    """One engine's measurement on one prompt (medians over repeats)."""

    prefill_ms: float  # median
    decode_tok_s: float  # at the median decode time
    decode_gb_s: float
    prefill_ms_best: float  # fastest run: the least disturbed by other load on a shared machine
    decode_tok_s_best: float
    kv_bytes: int  # K/V (and slot metadata for nanokv) held at the end of decoding
    peak_mem_bytes: int  # peak RSS (CPU) or max memory allocated (CUDA) during the run
    peak_extra_bytes: int  # that peak minus what was held just before the run
    tokens: list[int]


# ------------------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF-layout model dir (default: SmolLM2-135M)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--repeats", type=int, default=3, help="runs per length; medians reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="order of the stdlib files in the prompt")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    args = p.parse_args(argv)
    threads_ok = args.threads is None or args.threads >= 1
    if min(args.lengths) < 1 or args.new_tokens < 2 or args.repeats < 1 or not threads_ok:
        p.error("--lengths and --threads must be >= 1, --new-tokens >= 2, --repeats >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but torch sees no CUDA device")
    return args


# ------------------------------------------------------------------------------------- machine


def sync(device: torch.device) -> None:
    """Waits for queued device work, so that perf_counter measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def copy_bandwidth_gb_s(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Measured device-memory bandwidth: best of `repeats` copies of a `mib` MiB buffer,
    counting the bytes read and written."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


# -------------------------------------------------------------------------------------- memory


def current_memory(device: torch.device) -> int:
    """Bytes held now: RSS on CPU, allocated tensors on CUDA."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status_kib("VmRSS") * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak window (on Linux, writing 5 to clear_refs resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # then the peak covers the whole process so far
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> int:
    """Peak bytes since the last reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _status_kib("VmHWM")
    if hwm:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------------- prompts


def stdlib_token_stream(encode: Callable[[str], list[int]], count: int, seed: int) -> list[int]:
    """At least `count` token ids of real text: Python standard-library sources, in a seeded
    order, concatenated and tokenized in one piece."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    random.Random(seed).shuffle(files)
    chunks, chars = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        chunks.append(text)
        chars += len(text)
        if chars > 6 * count:  # code runs at ~3-4 characters a token
            ids = encode("\n".join(chunks))
            if len(ids) >= count:
                return ids
    raise RuntimeError(f"the standard library holds fewer than {count} tokens of source")


# ----------------------------------------------------------------------------------- measuring


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameter tensors (tied embeddings counted once)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in module.parameters()}
    return sum(seen.values())


def context_kv_bytes(cfg: ModelConfig, n: int, element_size: int) -> int:
    """Bytes of the K/V of `n` tokens across all layers (what full attention reads)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * n * element_size


def run_nanokv(llm: nanokv.LLM, prompt: list[int], new_tokens: int) -> Timed:
    """Prefill (arena allocation included) and greedy decode with nanokv."""
    engine, device = llm.engine, llm.device
    sync(device)
    start = time.perf_counter()
    state, logits = engine.start([prompt], new_tokens)
    sync(device)
    prefill = time.perf_counter() - start
    tokens = [logits.argmax(-1)]  # (1,)
    for _ in range(new_tokens - 1):
        tokens.append(engine.step(state, tokens[-1]).argmax(-1))
    sync(device)
    decode = time.perf_counter() - start - prefill
    return Timed(prefill, decode, tokens, state.arena.nbytes)


def run_transformers(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> Timed:
    """Prefill and greedy decode with transformers, same contract as run_nanokv."""
    device = model.device
    ids = torch.tensor([prompt], device=device)  # (1, n)
    sync(device)
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill = time.perf_counter() - start
    name = _cache_argument(model)
    cache = getattr(out, name)
    tokens = [out.logits[:, -1].argmax(-1)]  # (1,)
    for _ in range(new_tokens - 1):
        out = model(tokens[-1].view(1, 1), use_cache=True, **{name: cache})
        tokens.append(out.logits[:, -1].argmax(-1))
    sync(device)
    decode = time.perf_counter() - start - prefill
    return Timed(prefill, decode, tokens, _cache_bytes(cache))


def _cache_argument(model: torch.nn.Module) -> str:
    """The KV-cache keyword of `forward`: `cache` in recent transformers 5.x, where
    `past_key_values` is deprecated, `past_key_values` before."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _cache_bytes(cache: object) -> int:
    """Bytes of a transformers cache's key and value tensors."""
    tensors = [t for layer in getattr(cache, "layers", []) for t in (layer.keys, layer.values)]
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_length(
    engines: dict, prompt: list[int], args: argparse.Namespace, step_bytes: int
) -> dict[str, Run]:
    """`args.repeats` rounds on one prompt, the engines taking turns within each round so that
    load from other processes on a shared machine falls on both alike."""
    samples = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, (run, engine) in engines.items():
            samples[name].append(sample(run, engine, prompt, args))
    return {name: summarise(s, args.new_tokens, step_bytes) for name, s in samples.items()}


def sample(
    run: Callable[..., Timed], engine: object, prompt: list[int], args: argparse.Namespace
) -> tuple[Timed, int, int]:
    """One run with its memory: (timings, peak bytes, peak bytes above what was held before)."""
    device = torch.device(args.device)
    before = current_memory(device)
    reset_peak_memory(device)
    with torch.inference_mode():
        timed = run(engine, prompt, args.new_tokens)
    peak = peak_memory(device)
    return timed, peak, peak - before


def summarise(samples: list[tuple[Timed, int, int]], new_tokens: int, step_bytes: int) -> Run:
    """Medians of the timings, max of the memory, tokens and K/V bytes of the last run."""
    timed = [t for t, _, _ in samples]
    prefills, decodes = [t.prefill_s for t in timed], [t.decode_s for t in timed]
    tok_s = (new_tokens - 1) / statistics.median(decodes)
    return Run(
        prefill_ms=round(statistics.median(prefills) * 1e3, 2),
        decode_tok_s=round(tok_s, 2),
        decode_gb_s=round(tok_s * step_bytes / 1e9, 2),
        prefill_ms_best=round(min(prefills) * 1e3, 2),
        decode_tok_s_best=round((new_tokens - 1) / min(decodes), 2),
        kv_bytes=timed[-1].kv_bytes,
        peak_mem_bytes=max(peak for _, peak, _ in samples),
        peak_extra_bytes=max(extra for _, _, extra in samples),
        tokens=torch.cat(timed[-1].tokens).tolist(),
    )


# ------------------------------------------------------------------------------------- engines


def load_engines(args: argparse.Namespace) -> tuple[dict, nanokv.LLM]:
    """Loads the engines asked for on the same model directory, dtype and device.
    Returns ({name: (run function, engine)}, the nanokv LLM, loaded in any case for its
    tokenizer, config and model directory)."""
    llm = nanokv.LLM(args.model, dtype=args.dtype, device=args.device)
    engines = {"nanokv": (run_nanokv, llm)} if "nanokv" in args.engines else {}
    if "transformers" in args.engines:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        model = AutoModelForCausalLM.from_pretrained(llm.model_dir, dtype=DTYPES[args.dtype])
        engines["transformers"] = (run_transformers, model.to(args.device).eval())
    return engines, llm


def engine_info(engines: dict, llm: nanokv.LLM) -> dict:
    """How each engine runs: nanokv's prefill chunk and decode-attention path, transformers'
    version, attention implementation and decode method."""
    info = {}
    if "nanokv" in engines:
        cuda_kernel = llm.device.type == "cuda" and triton_available()
        info["nanokv_prefill_chunk"] = llm.engine.prefill_chunk
        info["nanokv_decode_attention"] = "triton split-K" if cuda_kernel else "torch reference"
    if "transformers" in engines:
        import transformers

        model = engines["transformers"][1]
        info["transformers_version"] = transformers.__version__
        info["transformers_attention"] = model.config._attn_implementation
        info["transformers_decode"] = HF_DECODE_METHOD
    return info


def warm_up(engines: dict, stream: list[int]) -> None:
    """One short prefill + decode per engine: first-call allocations and kernel selection."""
    for run, engine in engines.values():
        with torch.inference_mode():
            run(engine, stream[:WARMUP_TOKENS], WARMUP_NEW)


# -------------------------------------------------------------------------------------- report


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two runs agree on."""
    count = 0
    for x, y in zip(a, b, strict=True):
        if x != y:
            break
        count += 1
    return count


def length_line(n: int, runs: dict[str, Run], args: argparse.Namespace, meta: dict) -> dict:
    """The JSON object of one prompt length."""
    line = {"bench": "e2e", "prompt_tokens": n, **meta}
    for name, run in runs.items():
        line[name] = {k: v for k, v in asdict(run).items() if k != "tokens"}
    if len(runs) == 2:
        nk, hf = runs["nanokv"], runs["transformers"]
        matching = common_prefix(nk.tokens, hf.tokens)
        line["same_tokens"] = matching == args.new_tokens
        line["matching_tokens"] = matching
        line["ratio"] = {key: round(getattr(nk, key) / getattr(hf, key), 3) for key in RATIOS}
    return line


def summary_line(lines: list[dict], meta: dict, bandwidth: float) -> dict:
    """The final JSON object: per-length ratios and their geometric means."""
    ratios = {line["prompt_tokens"]: line["ratio"] for line in lines if "ratio" in line}
    out = {"bench": "e2e-summary", **meta, "copy_bandwidth_gb_s": round(bandwidth, 2)}
    out["lengths"] = [line["prompt_tokens"] for line in lines]
    if ratios:
        out["ratios"] = ratios
        for key in RATIOS:
            values = [r[key] for r in ratios.values()]
            out[f"geomean_{key}_ratio"] = round(statistics.geometric_mean(values), 3)
        out["all_same_tokens"] = all(line["same_tokens"] for line in lines)
    return out


def emit(line: dict, sink: list[str]) -> None:
    """Prints one JSON line now (so a long run shows progress) and keeps it for --out."""
    text = json.dumps(line)
    print(text, flush=True)
    sink.append(text)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the process exit status."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    engines, llm = load_engines(args)
    context = llm.config.max_position_embeddings
    if max(args.lengths) + args.new_tokens > context:
        sys.exit(f"e2e.py: error: prompt + new tokens exceed the model's {context}-token context")
    stream = stdlib_token_stream(llm.tokenizer.encode, max(args.lengths), args.seed)
    warm_up(engines, stream)
    element_size = DTYPES[args.dtype].itemsize
    meta = {
        "model": str(llm.model_dir),
        "dtype": args.dtype,
        "device": args.device,
        "batch": 1,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        **engine_info(engines, llm),
        "machine": machine_info(device),
    }
    weights = weight_bytes(llm.model)
    lines, sink = [], []
    for n in args.lengths:
        context = n + args.new_tokens // 2
        step_bytes = weights + context_kv_bytes(llm.config, context, element_size)
        runs = measure_length(engines, stream[:n], args, step_bytes)
        lines.append(length_line(n, runs, args, meta))
        emit(lines[-1], sink)
    emit(summary_line(lines, meta, copy_bandwidth_gb_s(device)), sink)
    if args.out is not None:
        args.out.resolve().write_text("\n".join(sink) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
