"""`--dtype auto`: bf16 where the CPU says it does bf16 natively, fp32 elsewhere, and why."""

from __future__ import annotations

import pytest
import torch

from nanokv import dtypes
from nanokv.cli import main
from nanokv.dtypes import cpu_bf16_flags, resolve_dtype
from nanokv.llm import LLM

CPU = torch.device("cpu")
SAPPHIRE_RAPIDS = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile\n"
ICE_LAKE = "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
GRAVITON3 = "Features\t: fp asimd sve bf16 i8mm\n"


def _cpuinfo(tmp_path, text: str):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\n" + text + "\n")
    return path


@pytest.mark.parametrize(
    ("text", "flags"),
    [(SAPPHIRE_RAPIDS, ("avx512_bf16", "amx_bf16")), (ICE_LAKE, ()), (GRAVITON3, ("bf16",))],
    ids=["amx", "avx512-without-bf16", "arm-bf16"],
)
def test_auto_picks_bf16_only_where_the_cpu_has_it(tmp_path, text, flags):
    path = _cpuinfo(tmp_path, text)
    assert cpu_bf16_flags(path) == flags
    for choice in (None, "auto"):
        dtype, reason = resolve_dtype(choice, CPU, cpuinfo=path)
        assert dtype == (torch.bfloat16 if flags else torch.float32)
        assert reason.startswith("auto: ") and all(flag in reason for flag in flags)


def test_unreadable_cpuinfo_means_fp32(tmp_path):
    assert cpu_bf16_flags(tmp_path / "missing") == ()
    assert resolve_dtype("auto", CPU, cpuinfo=tmp_path / "missing")[0] == torch.float32


@pytest.mark.parametrize(
    ("given", "dtype"),
    [("float32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
     (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
def test_an_explicit_dtype_is_taken_as_given(tmp_path, given, dtype):
    assert resolve_dtype(given, CPU, cpuinfo=_cpuinfo(tmp_path, SAPPHIRE_RAPIDS)) == (
        dtype,
        "given",
    )


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="choose auto, float32, bfloat16 or float16"):
        resolve_dtype("float8", CPU)


def test_llm_defaults_to_auto_and_says_why(tiny_llama_dir):
    llm = LLM(tiny_llama_dir)
    assert (llm.dtype, llm.dtype_reason) == resolve_dtype("auto", CPU)
    assert next(llm.model.parameters()).dtype == llm.dtype
    assert LLM(tiny_llama_dir, dtype="float32").dtype_reason == "given"


def test_verbose_generate_reports_the_dtype(tiny_llama_dir, capsys):
    argv = ["generate", "--model", str(tiny_llama_dir), "--max-new-tokens", "2", "--verbose"]
    assert main([*argv, "hello"]) == 0
    dtype, reason = resolve_dtype("auto", CPU)
    err = capsys.readouterr().err
    name = str(dtype).removeprefix("torch.")
    assert f"dtype: {name} ({reason}); KV cache: {name}" in err.splitlines()
    assert main([*argv, "--dtype", "float32", "hello"]) == 0
    assert "dtype: float32 (given); KV cache: float32" in capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(("flags", "native"), [((), False), (("avx512_bf16",), True)])
def test_half_is_native_on_cuda_and_on_cpus_with_bf16_instructions(monkeypatch, flags, native):
    monkeypatch.setattr(dtypes, "cpu_bf16_flags", lambda: flags)
    dtypes.half_is_native.cache_clear()
    try:
        assert dtypes.half_is_native("cpu") is native
        assert dtypes.half_is_native("cuda") is True
    finally:
        dtypes.half_is_native.cache_clear()
