"""bench/dtype_fidelity.py end to end on a tiny model: float32 against itself is exact, bf16 is
measurably (and finitely) different, the lines have their shape, and bad input is one line on
stderr with exit status 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench
from tiny_models import make_hf_model, save_checkpoint

CASE_KEYS = {
    "bench", "dtype", "reference", "case", "source", "file", "length", "tokens", "seed",
    "agreement", "kl", "cosine_mean", "cosine_min", "cosine", "accuracy", "accuracy_reference",
    "kept_tokens", "kept_tokens_reference", "model",
}  # fmt: skip
MEAN_KEYS = {
    "agreement", "kl", "kl_max", "cosine_mean", "cosine_min", "accuracy", "accuracy_reference",
}  # fmt: skip
LENGTH, TOKENS, CASES = 48, 6, 2


def _bench():
    return load_bench("dtype_fidelity")


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """main(--threads 1) sets torch's thread count for the process; later tests get it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The two-layer tiny Llama (context 256 tokens)."""
    return save_checkpoint(make_hf_model("llama"), tmp_path_factory.mktemp("tiny-llama-dtype"))


def _run(bench, capsys, argv: list[str]) -> list[dict]:
    assert bench.main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _argv(tiny_dir: Path, *extra: str) -> list[str]:
    return [
        "--model", str(tiny_dir), "--length", str(LENGTH), "--tokens", str(TOKENS),
        "--cases", str(CASES), "--threads", "1", *extra,
    ]  # fmt: skip


def test_float32_is_exact_and_bf16_is_not(bench, tiny_dir, tmp_path, capsys):
    out = tmp_path / "fidelity.jsonl"
    argv = _argv(tiny_dir, "--dtypes", "fp32", "bf16", "--out", str(out))
    lines = _run(bench, capsys, argv)
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    rows, summary = lines[:-1], lines[-1]
    assert len(rows) == 2 * 2 * CASES  # dtypes x sources x seeds
    for row in rows:
        assert set(row) == CASE_KEYS and row["bench"] == "dtype_fidelity"
        assert row["reference"] == "float32" and row["length"] == LENGTH
        assert len(row["cosine"]) == 2  # one per layer
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["accuracy_reference"] <= 1.0
    fp32 = [row for row in rows if row["dtype"] == "float32"]
    bf16 = [row for row in rows if row["dtype"] == "bfloat16"]
    assert len(fp32) == len(bf16) == 2 * CASES
    assert {row["case"] for row in fp32} == {row["case"] for row in bf16}
    for row in fp32:
        assert row["agreement"] == 1.0 and row["kl"] == 0.0
        assert row["accuracy"] == row["accuracy_reference"]
        assert all(c == pytest.approx(1.0, abs=1e-6) for c in row["cosine"])
    for row in bf16:
        assert 0.0 < row["kl"] < math.inf
        assert 0.0 <= row["agreement"] <= 1.0
        assert row["cosine_min"] < 1.0
    assert summary["bench"] == "dtype_fidelity-summary" and summary["cases"] == 2 * CASES
    assert set(summary["means"]) == {"float32", "bfloat16"}
    assert all(set(means) == MEAN_KEYS for means in summary["means"].values())
    assert summary["means"]["float32"]["kl_max"] == 0.0
    assert summary["means"]["bfloat16"]["kl"] > 0.0
    assert summary["policy"] == "full" and summary["command"].endswith(" ".join(argv[-6:]))


def test_a_policy_runs_in_both_dtypes(bench, tiny_dir, capsys):
    argv = _argv(tiny_dir, "--dtypes", "float32", "--policy", "snapkv", "--budget", "0.5")
    lines = _run(bench, capsys, [*argv, "--sources", "docs"])
    rows, summary = lines[:-1], lines[-1]
    assert summary["policy"] == "snapkv" and summary["budget"] == 0.5
    for row in rows:
        assert row["kept_tokens"] == row["kept_tokens_reference"] < LENGTH
        assert row["agreement"] == 1.0 and row["kl"] == 0.0


def test_a_bf16_kv_cache_under_fp32_weights_is_its_own_row(bench, tiny_dir, capsys):
    """--kv-dtype bfloat16 with --dtypes float32 bfloat16: fp32 weights with a bf16 cache
    differ from fp32 (rounded K/V), less than bf16 everywhere does."""
    argv = _argv(tiny_dir, "--dtypes", "float32", "bfloat16", "--kv-dtype", "bfloat16")
    lines = _run(bench, capsys, [*argv, "--sources", "docs"])
    rows, summary = lines[:-1], lines[-1]
    assert [row["dtype"] for row in rows] == ["float32+kv-bfloat16"] * CASES + ["bfloat16"] * CASES
    means = summary["means"]
    assert set(means) == {"float32+kv-bfloat16", "bfloat16"} and summary["cases"] == CASES
    assert 0.0 < means["float32+kv-bfloat16"]["kl"] < means["bfloat16"]["kl"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dtypes", "int8"], "unknown dtype 'int8'"),
        (["--length", "0"], "--length must be a positive"),
        (["--length", "300"], "exceed the model's context"),
        (["--policy", "nope"], "unknown policy 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_status_2(bench, tiny_dir, capsys, extra, message):
    assert bench.main(_argv(tiny_dir, *extra)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err


def test_a_missing_model_dir_is_bad_input(bench, tmp_path, capsys):
    assert bench.main(["--model", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dtype_fidelity.py: error: model directory") and err.count("\n") == 1
