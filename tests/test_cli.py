"""`nanokv generate` on a tiny model, and one clear line + exit 2 for every kind of bad input."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
from tiny_models import llama_config, make_hf_model, save_checkpoint

from nanokv.cli import BENCH_SCRIPTS, BENCHMARKS, main
from nanokv.llm import LLM
from nanokv.policies import POLICIES
from nanokv.policies.allocation import ALLOCATIONS
from nanokv.sampling import SamplingParams

EVICTING = ["streaming", "h2o", "snapkv", "tova", "auv", "laprox"]
# Every name and composed mode the README lists for --policy.
POLICY_SPECS = ["full", *EVICTING, "quest", *(f"{name}+quest" for name in EVICTING)]
LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 8  # 94 tokens with the template
# An exact budget and a small sink + window, so that the policies' scores choose what is kept.
EXACT = {"min_cache": 0, "sinks": 2, "observation_window": 4}
EXACT_FLAGS = ["--min-cache", "0", "--sinks", "2", "--window", "4"]
NEW_TOKENS = 6


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


def _params(max_new_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, seed=0)


def _generate(model: Path, *flags: str, new_tokens: int = NEW_TOKENS) -> list[str]:
    """`nanokv generate` argv for `model`, greedy, seeded, a few tokens."""
    return [
        "generate", "--model", str(model), "--max-new-tokens", str(new_tokens), "--seed", "0",
        *flags,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def three_layer_dir(tmp_path_factory) -> Path:
    """The tiny Llama with a third layer: Quest keeps the first two layers dense, so only a third
    one lets `quest` change what each step reads."""
    with pytest.MonkeyPatch.context() as patch:
        three = lambda: llama_config(num_hidden_layers=3)
        patch.setitem(tiny_models.CONFIGS, "llama-3-layers", three)
        model = make_hf_model("llama-3-layers")
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny-llama-3-layers"))


def test_generate_streams_text_on_a_tiny_model(tiny_llama_dir, capsys):
    code, out, err = _run([*_generate(tiny_llama_dir, new_tokens=8), "hello world"], capsys)
    assert code == 0, err
    (want,) = LLM(tiny_llama_dir).chat("hello world", _params(8))
    assert want.text and out == want.text + "\n"


def test_generate_batch_prints_each_prompt(tiny_llama_dir, capsys):
    prompts = ["the quick fox", "a lazy dog jumps"]
    code, out, err = _run([*_generate(tiny_llama_dir, "--raw", new_tokens=4), *prompts], capsys)
    assert code == 0, err
    want = LLM(tiny_llama_dir).generate(prompts, _params(4))
    assert out == "".join(f"--- [{i}] ---\n{o.text}\n" for i, o in enumerate(want))


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_every_allocation_streams_what_llm_chat_returns(three_layer_dir, capsys, allocation):
    """Each --allocation the README lists runs from the CLI and prints what the Python API gives
    for the same options."""
    argv = _generate(three_layer_dir, "--policy", "snapkv", "--budget", "0.3", *EXACT_FLAGS)
    code, out, err = _run([*argv, "--allocation", allocation, LONG_PROMPT], capsys)
    assert code == 0, err
    llm = LLM(three_layer_dir, policy="snapkv", budget=0.3, allocation=allocation, **EXACT)
    (want,) = llm.chat(LONG_PROMPT, _params())
    assert want.text and out == want.text + "\n"


def test_the_policy_specs_cover_the_registry():
    assert ["full", *EVICTING] == list(POLICIES)


@pytest.mark.parametrize("policy", POLICY_SPECS)
def test_every_policy_streams_what_llm_chat_returns(three_layer_dir, capsys, policy):
    """Each --policy the README lists runs from the CLI, evicts (or reads sparsely) on a long
    prompt, and prints exactly what the Python API gives for the same options and seed."""
    budget = 1.0 if policy == "full" else 0.3
    argv = _generate(three_layer_dir, "--policy", policy, "--budget", str(budget), *EXACT_FLAGS)
    code, out, err = _run([*argv, "--verbose", LONG_PROMPT], capsys)
    assert code == 0, err
    llm = LLM(three_layer_dir, policy=policy, budget=budget, **EXACT)
    (want,) = llm.chat(LONG_PROMPT, _params())
    assert want.text and out == want.text + "\n"
    report = llm.last_report
    assert err.splitlines()[0] == report.summary().splitlines()[0]  # policy and tokens kept
    evicts = policy not in ("full", "quest")
    assert (int(report.kept_after_prefill.max()) < report.prompt_tokens[0]) == evicts
    if "quest" in policy:
        assert report.quest_read_fraction < 1


@pytest.mark.parametrize(("min_cache", "kept"), [(None, 94), ("0", 28), ("40", 40)])
def test_min_cache_sets_the_cache_floor(tiny_llama_dir, capsys, min_cache, kept):
    """The default floor (128) keeps a 94-token prompt whole; 0 makes 30% exact; 40 lifts it."""
    flags = [] if min_cache is None else ["--min-cache", min_cache]
    argv = _generate(tiny_llama_dir, "--policy", "h2o", "--budget", "0.3", *flags, "--verbose")
    code, out, err = _run([*argv, LONG_PROMPT], capsys)
    assert code == 0, err
    assert f"kept per head after prefill: mean {kept:.1f}, min {kept}, max {kept}" in err
    options = {} if min_cache is None else {"min_cache": int(min_cache)}
    (want,) = LLM(tiny_llama_dir, policy="h2o", budget=0.3, **options).chat(LONG_PROMPT, _params())
    assert out == want.text + "\n"


DOCUMENT = "Ada Lovelace wrote the first program.\n" * 3


def _asked_about_document(llm: LLM, question: str) -> str:
    """What the API answers for the document and the question joined into one user message."""
    (want,) = llm.chat(DOCUMENT.rstrip() + "\n\n" + question, _params())
    return want.text + "\n"


def test_document_from_a_file(tiny_llama_dir, tmp_path, capsys):
    path = tmp_path / "report.txt"
    path.write_text(DOCUMENT)
    argv = _generate(tiny_llama_dir, "--document", str(path), "Who wrote it?")
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert out == _asked_about_document(LLM(tiny_llama_dir), "Who wrote it?")


def test_document_from_stdin(tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(DOCUMENT))
    argv = _generate(tiny_llama_dir, "--document", "-", "--policy", "snapkv", "--budget", "0.5")
    code, out, err = _run([*argv, *EXACT_FLAGS, "Who wrote it?"], capsys)
    assert code == 0, err
    llm = LLM(tiny_llama_dir, policy="snapkv", budget=0.5, **EXACT)
    assert out == _asked_about_document(llm, "Who wrote it?")


def test_document_and_prompt_cannot_both_read_stdin(tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(DOCUMENT))
    code, _, err = _run(_generate(tiny_llama_dir, "--document", "-", "-"), capsys)
    _assert_one_line_error(code, err, "not both")


def test_missing_document(tiny_llama_dir, tmp_path, capsys):
    missing = tmp_path / "absent.txt"
    code, _, err = _run(_generate(tiny_llama_dir, "--document", str(missing), "hi"), capsys)
    _assert_one_line_error(code, err, f"--document {missing}: no such file")


def test_empty_document(tiny_llama_dir, tmp_path, capsys):
    path = tmp_path / "empty.txt"
    path.write_text("\n")
    code, _, err = _run(_generate(tiny_llama_dir, "--document", str(path), "hi"), capsys)
    _assert_one_line_error(code, err, "empty")


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
     ("nan", "fraction in (0, 1]"), ("2.5", "whole")],
)  # fmt: skip
def test_bad_budget(tiny_llama_dir, capsys, budget, fragment):
    code, _, err = _run(
        ["generate", "--model", str(tiny_llama_dir), "--budget", budget, "hi"], capsys
    )
    _assert_one_line_error(code, err, fragment)


def test_a_budget_for_the_full_cache_is_refused(tiny_llama_dir, capsys):
    argv = ["generate", "--model", str(tiny_llama_dir), "--policy", "full", "--budget", "0.5"]
    code, _, err = _run([*argv, "hi"], capsys)
    _assert_one_line_error(code, err, "needs an eviction policy", "unset for laprox")


def test_a_budget_without_a_policy_runs_the_default_eviction_policy(tiny_llama_dir, capsys):
    """`nanokv generate --budget 0.05 "prompt"` compresses (with LaProx), it does not keep the
    full cache; without --budget the full cache runs."""
    argv = ["generate", "--model", str(tiny_llama_dir), "--max-new-tokens", "2", "--verbose"]
    code, _, err = _run([*argv, "--budget", "0.3", "--min-cache", "0", LONG_PROMPT], capsys)
    assert code == 0 and "policy laprox:" in err
    kept = float(re.search(r"kept per head after prefill: mean ([\d.]+)", err).group(1))
    assert kept <= 0.3 * 94 + 1  # the prompt: 94 tokens with the template
    code, _, err = _run([*argv, LONG_PROMPT], capsys)
    assert code == 0 and "policy full:" in err


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


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [("x", "unknown policy 'x'"), ("x+quest", "unknown policy 'x'"),
     ("h2o+snapkv", "at most one eviction policy"), ("quest+quest", "at most one")],
)  # fmt: skip
def test_unknown_policy(tiny_llama_dir, capsys, policy, fragment):
    argv = ["generate", "--model", str(tiny_llama_dir), "--policy", policy, "hi"]
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, fragment)


def test_negative_min_cache(tiny_llama_dir, capsys):
    argv = ["generate", "--model", str(tiny_llama_dir), "--min-cache", "-1", "hi"]
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, "min_cache", ">= 0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no CUDA")
def test_cuda_on_a_machine_without_cuda(tiny_llama_dir, capsys):
    argv = ["generate", "--model", str(tiny_llama_dir), "--device", "cuda", "hi"]
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, "CUDA was asked for", "use --device cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a machine with CUDA")
def test_cuda_device_beyond_the_last(tiny_llama_dir, capsys):
    device = f"cuda:{torch.cuda.device_count()}"
    argv = ["generate", "--model", str(tiny_llama_dir), "--device", device, "hi"]
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, "does not exist")


@pytest.mark.parametrize(("device", "fragment"), [("tpu9", "unknown device"), ("mps", "cpu")])
def test_unknown_device(tiny_llama_dir, capsys, device, fragment):
    argv = ["generate", "--model", str(tiny_llama_dir), "--device", device, "hi"]
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, f"{device!r}", fragment)


def _with_chat_template(model_dir: Path, tmp_path: Path, template: str) -> Path:
    """A copy of `model_dir` whose tokenizer_config.json holds `template`."""
    model = _copy(model_dir, tmp_path)
    path = model / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config))
    return model


@pytest.mark.parametrize(
    ("template", "fragment"),
    [("{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox refused unsafe code"),
     ("{{ cycler.__init__.__globals__.os.system('true') }}", "sandbox refused unsafe code"),
     ("{{ messages.append(messages[0]) }}", "sandbox refused unsafe code"),
     ("{% for m in messages %}{{ m['content'] }", "invalid jinja2 at line 1"),
     ("{{ raise_exception('roles must alternate') }}", "refused the conversation"),
     ("{{ 1 / 0 }}", "ZeroDivisionError")],
)  # fmt: skip
def test_rejected_chat_template(tiny_llama_dir, tmp_path, capsys, template, fragment):
    """A template the sandbox refuses (or that cannot compile or render) names its file."""
    model = _with_chat_template(tiny_llama_dir, tmp_path, template)
    code, out, err = _run(["generate", "--model", str(model), "hi"], capsys)
    config = model / "tokenizer_config.json"
    _assert_one_line_error(code, err, f"{config}: chat template rejected: ", fragment)
    assert out == ""


def test_raw_prompt_skips_a_broken_chat_template(tiny_llama_dir, tmp_path, capsys):
    model = _with_chat_template(tiny_llama_dir, tmp_path, "{{ ''.__class__.__mro__ }}")
    code, out, err = _run(_generate(model, "--raw", "hello world"), capsys)
    assert code == 0, err
    (want,) = LLM(model).generate("hello world", _params())
    assert out == want.text + "\n"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_bench_subcommand_runs_a_script(capsys, name):
    code, out, _ = _run(["bench", name, "--help"], capsys)
    assert code == 0 and "usage" in out.lower()
    assert f"{BENCH_SCRIPTS[name]}.py" in out  # the benchmark's own script ran
