"""Kernel microbenchmark: decode attention (with / without emission), Quest, SDPA, value norms.

What: for each (context length n, kept fraction f, GQA ratio, batch) one layer's arena is filled
with random post-RoPE keys and values, and one decode step is timed for
- ``sdpa_full``: ``scaled_dot_product_attention(enable_gqa=True)`` over all n tokens (no eviction);
- ``sdpa``: the same over the f * n kept slots (what an evicted arena holds);
- ``decode`` / ``decode_emit``: nanokv's decode attention over the kept slots, without and with the
  per-slot emission (attention mass and output contribution);
- ``quest``: page bounds -> upper bound -> page selection (budget f * n tokens) -> page-sparse
  attention over the full n-token arena (bounds maintenance is not timed: it happens at write);
- ``value_norms``: ``||v W_O^h||`` of the step's new token (the write-time cost emission adds).
Each line reports ms, the bytes the algorithm must read (attention: K and V of the slots read;
emission: K once more; Quest: the chosen pages plus the min/max bounds; value norms: the Gram
matrices), the effective GB/s they give, and that as a fraction of the machine's copy bandwidth
(a large ``copy_``, counting read + write). Above 1 means the data sat in cache between repeats.

On CPU the torch paths that run there are timed (``impl`` = ``torch+c`` where the C kernel of
``kernels/cpu_attention.c`` gives their output, ``torch`` where it is off or not built: SDPA),
with ``perf_counter`` after warm-up. On CUDA the Triton kernels are timed against the torch
references (``impl`` = triton vs torch) with ``triton.testing.do_bench``.

    python bench/attention_kernels.py --quick                  # small sweep, CPU-friendly
    python bench/attention_kernels.py --out bench/out/kernels  # full sweep, JSON + PNG
    python bench/attention_kernels.py --contexts 32768 --fractions 0.05 --gqa 4 --batch 8 \
        --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from nanokv.kernels import native  # noqa: E402
from nanokv.kernels.decode_attention import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    decode_attention_torch,
    triton_available,
)
from nanokv.kernels.quest import (  # noqa: E402
    page_bounds,
    page_upper_bound,
    select_pages,
    sparse_decode_attention,
    sparse_decode_attention_reference,
    sparse_decode_attention_torch,
)
from nanokv.kernels.value_norms import output_gram, value_output_norms  # noqa: E402

PAGE_SIZE = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK = dict(contexts=[1024, 4096, 16384, 32768], fractions=[0.1, 0.5], gqa=[1, 4], batch=[1])
FULL = dict(
    contexts=[1024, 2048, 4096, 8192, 16384, 32768],
    fractions=[0.05, 0.1, 0.25, 0.5],
    gqa=[1, 4, 8],
    batch=[1, 8],
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn``: do_bench on CUDA, perf_counter after a sync elsewhere."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gb_s(device: str, megabytes: int) -> float:
    """Achieved bandwidth of ``dst.copy_(src)`` on a large tensor, counting read + write."""
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, reps=7)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def make_layer(args, batch: int, group: int, context: int, kept: int) -> dict:
    """One layer's data: the full n-token arena (for Quest / sdpa_full) and the kept slots."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    heads, dim, dtype, device = args.kv_heads, args.head_dim, DTYPES[args.dtype], args.device
    shape = (batch, heads, context, dim)
    k_full = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    v_full = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    q = torch.randn(batch, heads * group, dim, generator=gen).to(device=device, dtype=dtype)
    hidden = heads * group * dim
    o_proj = torch.randn(hidden, hidden, generator=gen).to(device=device, dtype=dtype) / hidden**0.5
    kmin, kmax = page_bounds(k_full, torch.full((batch, heads), context, device=device), PAGE_SIZE)
    return dict(
        q=q,
        k_full=k_full,
        v_full=v_full,
        k=k_full[:, :, :kept].contiguous(),
        v=v_full[:, :, :kept].contiguous(),
        full_lengths=torch.full((batch, heads), context, dtype=torch.int32, device=device),
        lengths=torch.full((batch, heads), kept, dtype=torch.int32, device=device),
        norms=torch.rand(batch, heads * group, kept, device=device),
        kmin=kmin,
        kmax=kmax,
        gram=output_gram(o_proj, heads * group, dim),
        v_new=v_full[:, :, -1:],  # (B, H_kv, 1, D)
    )


def kernels_timed(device_type: str, triton_impl: bool) -> tuple[Callable, Callable, str]:
    """(decode attention, Quest's sparse attention, impl label) of a pass: the Triton kernels;
    on a CPU the torch paths that run there (with the C kernel of kernels/cpu_attention.c where
    it applies: impl "torch+c"); on CUDA without Triton the references."""
    if triton_impl:
        return decode_attention, sparse_decode_attention, "triton"
    if device_type == "cpu":
        impl = "torch+c" if native.library("cpu_attention") is not None else "torch"
        return decode_attention_torch, sparse_decode_attention_torch, impl
    return decode_attention_reference, sparse_decode_attention_reference, "torch"


def operations(data: dict, scale: float, kept: int, triton_impl: bool) -> dict:
    """(name, impl) -> (callable, bytes it must read)."""
    q, k, v, lengths = data["q"], data["k"], data["v"], data["lengths"]
    q4 = q.unsqueeze(2)  # (B, H_q, 1, D) for SDPA
    sdpa = torch.nn.functional.scaled_dot_product_attention
    attend, sparse, impl = kernels_timed(q.device.type, triton_impl)
    batch, kv_heads, context, dim = data["k_full"].shape
    row = batch * kv_heads * dim * k.element_size()  # bytes of one slot's key, all (b, kv head)
    pages_read = -(-kept // PAGE_SIZE)
    bounds = 2 * (-(-context // PAGE_SIZE))  # kmin and kmax of every page

    def quest():
        bound = page_upper_bound(q, data["kmin"], data["kmax"], scale)
        table = select_pages(bound, data["full_lengths"], kept, PAGE_SIZE)
        return sparse(q, data["k_full"], data["v_full"], data["full_lengths"], table, scale=scale)

    def full():
        return sdpa(q4, data["k_full"], data["v_full"], scale=scale, enable_gqa=True)

    def emit():
        return attend(q, k, v, lengths, scale=scale, value_norms=data["norms"], emit=True)

    norms_bytes = data["gram"].numel() * 4 + data["v_new"].numel() * v.element_size()
    return {
        ("sdpa_full", "torch"): (full, 2 * context * row),
        ("sdpa", "torch"): (lambda: sdpa(q4, k, v, scale=scale, enable_gqa=True), 2 * kept * row),
        ("decode", impl): (lambda: attend(q, k, v, lengths, scale=scale), 2 * kept * row),
        ("decode_emit", impl): (emit, 3 * kept * row),  # the emission pass reads K again
        ("quest", impl): (quest, (2 * pages_read * PAGE_SIZE + bounds) * row),
        ("value_norms", "torch"): (
            lambda: value_output_norms(data["v_new"], data["gram"]),
            norms_bytes,  # the (H_q, D, D) fp32 Gram matrices and the new values
        ),
    }


def run_config(args, batch, group, context, fraction, copy_gb_s) -> list[dict]:
    kept = max(PAGE_SIZE, round(fraction * context))
    data = make_layer(args, batch, group, context, kept)
    scale = 1 / math.sqrt(args.head_dim)
    impls = [False] + ([True] if args.device == "cuda" and triton_available() else [])
    rows = []
    for triton_impl in impls:
        for (name, impl), (fn, bytes_read) in operations(data, scale, kept, triton_impl).items():
            if triton_impl and impl == "torch":
                continue  # already timed in the torch pass
            ms = time_ms(fn, args.device, args.warmup, args.reps)
            gb_s = bytes_read / (ms * 1e-3) / 1e9
            rows.append(
                dict(
                    op=name,
                    impl=impl,
                    device=args.device,
                    dtype=args.dtype,
                    batch=batch,
                    gqa=group,
                    kv_heads=args.kv_heads,
                    head_dim=args.head_dim,
                    context=context,
                    kept_fraction=fraction,
                    kept_slots=kept,
                    ms=round(ms, 4),
                    bytes_read=bytes_read,
                    gb_s=round(gb_s, 3),
                    frac_of_copy=round(gb_s / copy_gb_s, 4),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict], path: Path, copy_gb_s: float) -> None:
    """Time and fraction of copy bandwidth vs context, one line per (op, impl), first config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = rows[0]
    pick = [
        r
        for r in rows
        if (r["batch"], r["gqa"], r["kept_fraction"])
        == (first["batch"], first["gqa"], first["kept_fraction"])
    ]
    fig, (ax_ms, ax_bw) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["op"], r["impl"]) for r in pick}):
        mine = [r for r in pick if (r["op"], r["impl"]) == key]
        series = sorted((r["context"], r["ms"], r["frac_of_copy"]) for r in mine)
        xs = [s[0] for s in series]
        ax_ms.plot(xs, [s[1] for s in series], marker="o", label=f"{key[0]} [{key[1]}]")
        if key[0] != "value_norms":
            ax_bw.plot(xs, [s[2] for s in series], marker="o", label=f"{key[0]} [{key[1]}]")
    title = f"{first['device']} {first['dtype']}, batch {first['batch']}, GQA {first['gqa']}, "
    title += f"kept {first['kept_fraction']:g}, copy {copy_gb_s:.1f} GB/s"
    for ax, label in ((ax_ms, "ms per decode step (one layer)"), (ax_bw, "fraction of copy GB/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length n")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_ms.set_yscale("log")
    ax_ms.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sweep (CPU-friendly)")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--fractions", type=float, nargs="+", help="kept fraction of the context")
    parser.add_argument("--gqa", type=int, nargs="+", help="query heads per kv head")
    parser.add_argument("--batch", type=int, nargs="+")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 else")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--copy-mb", type=int, default=512, help="size of the bandwidth probe")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="directory for kernels.json and kernels.png")
    args = parser.parse_args(argv)
    sweep = QUICK if args.quick else FULL
    for name, values in sweep.items():
        if getattr(args, name) is None:
            setattr(args, name, values)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    copy_gb_s = copy_bandwidth_gb_s(args.device, args.copy_mb)
    header = dict(
        copy_gb_s=round(copy_gb_s, 2), device=args.device, threads=torch.get_num_threads()
    )
    if args.device == "cuda":
        header["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(header), flush=True)
    rows = []
    for batch in args.batch:
        for group in args.gqa:
            for fraction in args.fractions:
                for context in args.contexts:
                    rows += run_config(args, batch, group, context, fraction, copy_gb_s)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.json").write_text(json.dumps(dict(**header, rows=rows), indent=1))
        plot(rows, args.out / "kernels.png", copy_gb_s)


if __name__ == "__main__":
    main()
