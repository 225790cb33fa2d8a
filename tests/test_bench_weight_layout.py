"""bench/weight_layout.py on a tiny model: its lines, the three layouts measured, the loader's
layout restored (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import assert_refuses, load_bench

from nanokv.kernels import cpu_linear

ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_weight_layout_bench_measures_every_layout(tiny_llama_dir, tmp_path, capsys):
    bench = load_bench("weight_layout")
    out = tmp_path / "layout.jsonl"
    argv = [
        "--model", str(tiny_llama_dir), "--reference", "40", "--length", "80", "--budget", "0.25",
        "--new-tokens", "4", "--repeats", "2", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    header, gemvs, cells, summary = lines[0], lines[1:4], lines[4:10], lines[-1]
    assert header["loader_layout"] in ("input-major", "output-major")
    layouts = ["output-major", "input-major", "input-major-all"]
    assert [g["layout"] for g in gemvs] == layouts
    assert gemvs[0]["bytes"] == gemvs[1]["bytes"] == gemvs[2]["bytes"] > 0
    assert gemvs[0]["weights"] == 2 * 4 + 1
    assert [(c["cell"], c["layout"]) for c in cells] == [
        (cell, layout) for cell in ("full@1.0@40", "laprox@0.25@80") for layout in layouts
    ]
    for cell in cells:
        assert cell["steps"] == 3 and len(cell["step_ms_rounds"]) == 2 and cell["step_ms"] > 0
    assert summary["full@1.0@40 same greedy tokens"] is True
    assert summary["laprox@0.25@80 same greedy tokens"] is True
    assert summary["laprox@0.25@80 output-major / input-major step"] > 0
    assert summary["laprox@0.25@80 input-major-all / input-major step"] > 0


@pytest.mark.skipif(not cpu_linear.available(), reason="cpu_linear.c did not build")
@pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN has no bf16 on this CPU")
def test_weight_layout_bench_measures_the_bf16_packings(tiny_llama_dir, capsys):
    bench = load_bench("weight_layout")
    argv = [
        "--model", str(tiny_llama_dir), "--reference", "40", "--length", "80", "--budget", "0.25",
        "--new-tokens", "4", "--repeats", "1", "--dtype", "bfloat16",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    header, gemvs, cells, summary = lines[0], lines[1:4], lines[4:10], lines[-1]
    assert header["dtype"] == "bfloat16" and header["loader_layout"] == "c-blocked"
    layouts = ["c-blocked", "onednn-packed", "output-major"]
    assert [g["layout"] for g in gemvs] == layouts
    assert gemvs[0]["bytes"] == gemvs[1]["bytes"] == gemvs[2]["bytes"] > 0
    assert [(c["cell"], c["layout"]) for c in cells] == [
        (cell, layout) for cell in ("full@1.0@40", "laprox@0.25@80") for layout in layouts
    ]
    assert summary["full@1.0@40 onednn-packed / c-blocked step"] > 0
    assert summary["laprox@0.25@80 output-major / c-blocked step"] > 0
    assert isinstance(summary["laprox@0.25@80 same greedy tokens"], bool)


def test_weight_layout_bench_refuses_bad_options(capsys):
    assert_refuses("weight_layout", ["--new-tokens", "1"], "--new-tokens >= 2", capsys)
