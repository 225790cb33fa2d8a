"""bf16 projections read from packed copies (models/linear.py), oneDNN's or the C kernel's blocks
(kernels/cpu_linear.py): the same model as the dense weights, and chosen only for bf16 on a CPU
with bf16 instructions (the C kernel's contract itself: tests/test_cpu_linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_scripts import load_bench
from tiny_models import make_hf_model, save_checkpoint

from nanokv.engine import Engine
from nanokv.kernels import cpu_linear
from nanokv.loader import load_config, load_model
from nanokv.models import linear
from nanokv.policies import make_policy

ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_onednn_bf16 = pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN has no bf16 on this CPU")
PACKINGS = [
    pytest.param("onednn", marks=needs_onednn_bf16),
    pytest.param(
        "blocked", marks=pytest.mark.skipif(not cpu_linear.available(), reason="no C compiler")
    ),
]
NAMES = {"onednn": "onednn-packed", "blocked": "c-blocked"}
PROMPTS = [[5, 17, 88, 130, 9, 44, 250, 31, 7, 66, 12, 99, 143, 8, 201, 77, 3, 45, 60], [11, 42, 7]]


@pytest.mark.parametrize(
    ("dtype", "device", "native", "c_kernel", "onednn", "expected"),
    [
        (torch.bfloat16, "cpu", True, True, True, "blocked"),
        (torch.bfloat16, "cpu", True, True, False, "blocked"),
        (torch.bfloat16, "cpu", True, False, True, "onednn"),  # no C compiler
        (torch.bfloat16, "cpu", True, False, False, None),
        (torch.bfloat16, "cpu", False, True, True, None),  # bf16 emulated: auto picks fp32 there
        (torch.float32, "cpu", True, True, True, None),
        (torch.float16, "cpu", True, True, True, None),
        (torch.bfloat16, "cuda", True, True, True, None),
    ],
)
def test_weights_are_packed_only_for_bf16_on_a_cpu_with_bf16_instructions(
    monkeypatch, dtype, device, native, c_kernel, onednn, expected
):
    monkeypatch.setattr(linear, "half_is_native", lambda device_type: native)
    monkeypatch.setattr(cpu_linear, "available", lambda: c_kernel)
    monkeypatch.setattr(linear, "onednn_does_bf16", lambda: onednn)
    assert linear.packing_for(dtype, torch.device(device)) == expected
    layout = linear.WeightLayout.for_machine(dtype, torch.device(device))
    assert layout.packing == expected and layout.pack is (expected is not None)
    unpacked = "input-major" if layout.input_major else "output-major"  # fp32 on AMD: input-major
    assert layout.name == NAMES.get(expected, unpacked)


def test_an_unknown_packing_is_refused():
    with pytest.raises(ValueError, match="unknown packing 'mkl'"):
        linear.WeightLayout(packing="mkl")


@needs_onednn_bf16
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_packed_weight_gives_the_dense_product_bit_for_bit(rows, with_bias):
    weight = torch.randn(96, 64, dtype=torch.bfloat16)
    bias = torch.randn(96, dtype=torch.bfloat16) if with_bias else None
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    packed = linear.packed(weight)
    assert packed.is_mkldnn
    assert torch.equal(linear.linear(x, packed, bias), F.linear(x, weight, bias))


def _reads(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every projection a decode step hands `linear` (the head's GEMV aside)."""
    reads = []
    for block in model.blocks:
        attn = block.self_attn
        reads += [attn.qkv_weight, getattr(attn, "o_weight", getattr(attn, "out_weight", None))]
        mlp = getattr(block, "mlp", None)
        reads += [mlp.gate_up_weight, mlp.down_weight] if mlp else list(block.fc_weights)
    project_out = getattr(model, "project_out_read", None)  # OPT's, where it has one
    return reads if project_out is None else [*reads, project_out]


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "opt", "opt-post-ln"])
def test_a_packed_model_decodes_as_the_dense_one(kind, packing, tmp_path):
    """prepare_weights packed, then not, then packed: every read switches to a packed
    copy and back; packed, the weights only `linear` reads are held once (no dense parameter),
    and switching back restores the checkpoint's values; prefill and decode logits are as close
    to the fp32 model's as the dense bf16 model's are (the kernels round elsewhere: the C
    kernel once a projection, after its norm, RoPE, GLU and residual add)."""
    path = save_checkpoint(make_hf_model(kind), tmp_path)
    cfg = load_config(path)
    fp32 = Engine(
        load_model(path, cfg, torch.float32, torch.device("cpu")), cfg, make_policy("full")
    )
    state, exact_prefill = fp32.start(PROMPTS, 4)
    exact = (exact_prefill, fp32.step(state, exact_prefill.argmax(-1)))
    model = load_model(path, cfg, torch.bfloat16, torch.device("cpu"))
    model.prepare_weights(linear.WeightLayout())
    original = {name: p.clone() for name, p in model.named_parameters()}
    dense_bytes = sum(p.nbytes for p in original.values())
    engine = Engine(model, cfg, make_policy("full"), prefill_chunk=5)
    results = {}
    for pack in (True, False, True):
        model.prepare_weights(linear.WeightLayout(packing=packing if pack else None))
        assert (model.head_read is not None) is pack
        assert all(linear.is_packed(read) is pack for read in _reads(model))
        fused = [getattr(block, "fused_finish", None) is not None for block in model.blocks]
        assert all(fused) is (pack and packing == "blocked" and kind.startswith("llama"))
        assert model.layout.name == (NAMES[packing] if pack else "output-major")
        held = dict(model.named_parameters())
        assert set(held) < set(original) if pack else set(held) == set(original)
        assert all(torch.equal(held[name], original[name]) for name in held)
        if pack:
            assert sum(p.nbytes for p in held.values()) < dense_bytes
        state, prefill = engine.start(PROMPTS, 4)
        results[pack] = (prefill, engine.step(state, prefill.argmax(-1)))
    for packed_logits, dense_logits, exact_logits in zip(*results.values(), exact, strict=True):
        scale = exact_logits.abs().max()
        assert (dense_logits - exact_logits).abs().max() < 0.04 * scale
        assert (packed_logits - exact_logits).abs().max() < 0.04 * scale


@pytest.mark.parametrize("packing", PACKINGS)
def test_the_bytes_a_step_reads_are_counted_alike_packed_or_not(tiny_llama_dir, packing):
    cfg = load_config(tiny_llama_dir)
    model = load_model(tiny_llama_dir, cfg, torch.bfloat16, torch.device("cpu"))
    e2e = load_bench("e2e")
    model.prepare_weights(linear.WeightLayout(packing=packing))
    packed_bytes = e2e.nanokv_weight_bytes(model)
    model.prepare_weights(linear.WeightLayout())
    assert e2e.nanokv_weight_bytes(model) == packed_bytes


def test_a_released_weight_without_its_packed_copy_is_refused():
    layer = torch.nn.Linear(4, 4)
    layer.weight = None
    with pytest.raises(ValueError, match="needs the packed copy"):
        linear.lay_out(layer, False)
