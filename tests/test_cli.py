"""`nanokv generate` on a tiny model, and one clear line + exit 2 for every kind of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanokv.cli import main


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("nanokv: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_generate_streams_text_on_a_tiny_model(tiny_llama_dir, capsys):
    code, out, err = _run(
        ["generate", "--model", str(tiny_llama_dir), "--max-new-tokens", "8", "hello world"],
        capsys,
    )
    assert code == 0, err
    assert out.endswith("\n") and len(out.strip()) > 0


def test_generate_batch_prints_each_prompt(tiny_llama_dir, capsys):
    argv = ["generate", "--model", str(tiny_llama_dir), "--max-new-tokens", "4", "--raw"]
    code, out, _ = _run([*argv, "the quick fox", "a lazy dog jumps"], capsys)
    assert code == 0
    assert "--- [0] ---" in out and "--- [1] ---" in out


def test_console_script_exit_status(tiny_llama_dir, tmp_path):
    """The installed entry point really exits non-zero with a single line on stderr."""
    missing = tmp_path / "nope"
    cmd = [sys.executable, "-m", "nanokv.cli", "generate", "--model", str(missing), "hi"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "does not exist" in result.stderr


@pytest.mark.parametrize(
    ("budget", "fragment"),
    [("0", "fraction in (0, 1]"), ("-1", "fraction in (0, 1]"), ("abc", "not a number"),
     ("nan", "fraction in (0, 1]"), ("2.5", "whole"), ("0.5", "needs an eviction policy")],
)  # fmt: skip
def test_bad_budget(tiny_llama_dir, capsys, budget, fragment):
    code, _, err = _run(
        ["generate", "--model", str(tiny_llama_dir), "--budget", budget, "hi"], capsys
    )
    _assert_one_line_error(code, err, fragment)


def test_missing_directory(tmp_path, capsys):
    code, _, err = _run(["generate", "--model", str(tmp_path / "absent"), "hi"], capsys)
    _assert_one_line_error(code, err, "does not exist")


def test_missing_config(tmp_path, capsys):
    code, _, err = _run(["generate", "--model", str(tmp_path), "hi"], capsys)
    _assert_one_line_error(code, err, "config.json")


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


def test_unknown_model_type(tiny_llama_dir, tmp_path, capsys):
    model = _copy(tiny_llama_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = _run(["generate", "--model", str(model), "hi"], capsys)
    _assert_one_line_error(code, err, "unknown model_type 'gpt_neox'")


def _weights_file(model: Path) -> Path:
    return sorted(model.glob("*.safetensors"))[0]


def test_truncated_safetensors(tiny_llama_dir, tmp_path, capsys):
    model = _copy(tiny_llama_dir, tmp_path)
    weights = _weights_file(model)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = _run(["generate", "--model", str(model), "hi"], capsys)
    _assert_one_line_error(code, err, "truncated")


def test_corrupt_safetensors_header(tiny_llama_dir, tmp_path, capsys):
    model = _copy(tiny_llama_dir, tmp_path)
    weights = _weights_file(model)
    data = bytearray(weights.read_bytes())
    data[8:24] = b"\x00garbage{{{{!!!!"
    weights.write_bytes(bytes(data))
    code, _, err = _run(["generate", "--model", str(model), "hi"], capsys)
    _assert_one_line_error(code, err, "corrupt")


def test_missing_tensor(tiny_llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = _copy(tiny_llama_dir, tmp_path)
    weights = _weights_file(model)
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights)
    code, _, err = _run(["generate", "--model", str(model), "hi"], capsys)
    _assert_one_line_error(code, err, "model.layers.1.mlp.up_proj.weight", "missing")


def test_wrong_shape(tiny_llama_dir, tmp_path, capsys):
    model = _copy(tiny_llama_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] += 1
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = _run(["generate", "--model", str(model), "hi"], capsys)
    _assert_one_line_error(code, err, "shape")


def test_shard_outside_model_directory(tiny_llama_dir, tmp_path, capsys):
    model = _copy(tiny_llama_dir, tmp_path)
    weights = _weights_file(model)
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    weights.unlink()
    code, _, err = _run(["generate", "--model", str(model), "hi"], capsys)
    _assert_one_line_error(code, err, "outside the model directory")


def test_prompt_longer_than_context(tiny_llama_dir, capsys):
    prompt = "the quick brown fox " * 200
    code, _, err = _run(["generate", "--model", str(tiny_llama_dir), "--raw", prompt], capsys)
    _assert_one_line_error(code, err, "context is 256 tokens")


def test_empty_prompt(tiny_llama_dir, capsys):
    code, _, err = _run(["generate", "--model", str(tiny_llama_dir), "   "], capsys)
    _assert_one_line_error(code, err, "empty")


def test_unknown_policy(tiny_llama_dir, capsys):
    code, _, err = _run(["generate", "--model", str(tiny_llama_dir), "--policy", "x", "hi"], capsys)
    _assert_one_line_error(code, err, "unknown policy")


def test_bench_subcommand_runs_a_script(capsys):
    code, out, _ = _run(["bench", "kernels", "--help"], capsys)
    assert code == 0 and "usage" in out.lower()
