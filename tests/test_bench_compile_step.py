"""bench/compile_step.py on a tiny model: its lines, eager and one compiled mode measured, the
eager methods restored on the block class (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import assert_refuses, load_bench

import nanokv
from nanokv.models.linear import is_packed, packing_for
from nanokv.models.llama import LlamaBlock

LOADER_PACKS_BF16 = packing_for(torch.bfloat16, torch.device("cpu")) is not None


def test_compile_step_bench_measures_eager_and_compiled(tiny_llama_dir, tmp_path, capsys):
    bench = load_bench("compile_step")
    eager = (LlamaBlock.qkv, LlamaBlock.finish)
    out = tmp_path / "compile.jsonl"
    argv = [
        "--model", str(tiny_llama_dir), "--reference", "40", "--length", "80", "--budget", "0.25",
        "--new-tokens", "3", "--repeats", "2", "--modes", "default", "--threads", "1",
        "--out", str(out),
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert (LlamaBlock.qkv, LlamaBlock.finish) == eager
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    header, cells, summary = lines[0], lines[1:5], lines[-1]
    assert header["dtype"] == "float32"
    variants = ["eager", "compile:default"]
    assert [(c["cell"], c["variant"]) for c in cells] == [
        (cell, variant) for cell in ("full@1.0@40", "laprox@0.25@80") for variant in variants
    ]
    for cell in cells:
        assert cell["steps"] == 2 and len(cell["step_ms_rounds"]) == 2 and cell["step_ms"] > 0
    assert summary["compile_s"]["compile:default"] > 0
    assert summary["laprox@0.25@80 compile:default / eager step"] > 0
    assert isinstance(summary["full@1.0@40 same greedy tokens"], bool)


def test_compile_step_bench_refuses_bad_options(capsys):
    assert_refuses("compile_step", ["--repeats", "0"], "--repeats >= 1", capsys)
    assert_refuses("compile_step", ["--modes", "fast"], "invalid choice", capsys)


@pytest.mark.skipif(not LOADER_PACKS_BF16, reason="the loader packs no bf16 weights on this CPU")
def test_compiled_variants_read_dense_weights_where_the_loader_packs_them(tiny_llama_dir):
    """inductor cannot read a packed copy: on a CPU where the loader packs bf16 weights,
    a compiled variant switches the model to its dense weights and eager back to the packed."""
    bench = load_bench("compile_step")
    model = nanokv.LLM(str(tiny_llama_dir), dtype="bfloat16", device="cpu").model
    variants = bench.DenseVariants(model, ["default"])
    try:
        assert variants.loaded.pack and model.head_read is not None
        variants.use("compile:default")
        assert model.head_read is None and not is_packed(model.blocks[0].self_attn.qkv_weight)
        variants.use("eager")
        assert model.head_read is not None and is_packed(model.blocks[0].self_attn.qkv_weight)
    finally:
        variants.use("eager")
