"""bench/e2e.py end to end on a tiny model: every cell's line, its bytes and the summary (a smoke
test of what is counted; no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_models
import torch
from bench_scripts import load_bench
from tiny_models import llama_config, make_hf_model, save_checkpoint

DTYPES = ("float32", "bfloat16")


def _bench():
    return load_bench("e2e")


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory) -> Path:
    """The tiny Llama with four layers: Quest keeps two dense and reads pages in two."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(tiny_models.CONFIGS, "llama-4", lambda: llama_config(num_hidden_layers=4))
        model = make_hf_model("llama-4")
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny-llama-4-layers"))


def test_e2e_counts_bytes_and_writes_every_cell(four_layer_dir, tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "e2e.jsonl"
    argv = [
        "--model", str(four_layer_dir), "--lengths", "40", "80", "--new-tokens", "3",
        "--policies", "snapkv", "quest@0.2", "--budget", "0.5", "--dtypes", "float32",
        "bfloat16", "--repeats", "1", "--copy-mib", "1", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    cells, summary = lines[:-1], lines[-1]
    # per dtype: full cache x 2 lengths x 2 engines, and the 2 policy cells at the longest
    assert len(cells) == 2 * (2 * 2 + 2)
    for cell in cells:
        assert cell["bytes_per_token"] == cell["weight_bytes"] + cell["kv_read_bytes"] > 0
        assert cell["achieved_gb_s"] > 0 and cell["floor_fraction"] > 0
        assert cell["floor_ms_per_token"] > 0 and cell["decode_cpu_ms_per_token"] > 0
    by = {(c["engine"], c["dtype"], c["policy"], c["prompt_tokens"]): c for c in cells}
    for dtype in DTYPES:
        full, quest = by[("nanokv", dtype, "full", 80)], by[("nanokv", dtype, "quest", 80)]
        assert quest["kv_read_bytes"] < full["kv_read_bytes"]  # reads its pages, not all
        assert by[("nanokv", dtype, "snapkv", 80)]["kv_held_bytes"] < full["kv_held_bytes"]
        # the full cache reads every held slot at the last step: 4 layers, 2 kv heads, 80 + 2
        # slots (2 decode steps; the arena has room for a third), 16-dim K and V
        element = 4 if dtype == "float32" else 2
        assert full["kv_read_bytes"] == 4 * 2 * (80 + 2) * 2 * 16 * element
    weights = {dtype: by[("nanokv", dtype, "full", 40)]["weight_bytes"] for dtype in DTYPES}
    assert weights["bfloat16"] < weights["float32"]
    assert summary["bench"] == "e2e-summary" and summary["copy_gb_s"] > 0
    assert "bfloat16 quest@0.2@80 / full@80" in summary["ratios"]
    assert "float32 full@40 nanokv / transformers" in summary["ratios"]
    assert "bfloat16 quest@0.2@80 faster than full@80" in summary["targets"]


def test_e2e_kv_dtypes_add_nanokv_cells_with_half_the_kv_bytes(four_layer_dir, capsys):
    """`--kv-dtypes auto bfloat16 float32` under fp32: the model's own cells once, then nanokv's
    cells with a bf16 cache (no transformers), reading and holding half the K/V bytes."""
    argv = [
        "--model", str(four_layer_dir), "--lengths", "40", "--new-tokens", "3", "--policies",
        "snapkv", "--budget", "0.5", "--dtypes", "float32", "--kv-dtypes", "auto", "bfloat16",
        "float32", "--repeats", "1", "--copy-mib", "1", "--threads", "1",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert _bench().main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    cells, summary = lines[:-1], lines[-1]
    assert [(c["engine"], c["dtype"], c["policy"]) for c in cells] == [
        ("nanokv", "float32", "full"), ("transformers", "float32", "full"),
        ("nanokv", "float32", "snapkv"),
        ("nanokv", "float32+kv-bfloat16", "full"), ("nanokv", "float32+kv-bfloat16", "snapkv"),
    ]  # fmt: skip
    by = {(c["dtype"], c["policy"]): c for c in cells if c["engine"] == "nanokv"}
    for policy in ("full", "snapkv"):
        exact, half = by[("float32", policy)], by[("float32+kv-bfloat16", policy)]
        assert half["kv_read_bytes"] * 2 == exact["kv_read_bytes"]
        assert half["kv_held_bytes"] < exact["kv_held_bytes"]  # K/V halved, metadata not
        assert half["weight_bytes"] == exact["weight_bytes"]
    assert by[("float32+kv-bfloat16", "full")]["nanokv_kv_dtype"] == "bfloat16"
    assert "float32+kv-bfloat16 snapkv@0.5@40 / full@40" in summary["ratios"]
