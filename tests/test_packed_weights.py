"""bf16 projections read from oneDNN-packed copies (models/linear.py): the same products as the
dense weights, the same model, and chosen only where oneDNN does bf16 on this CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_scripts import load_bench
from tiny_models import make_hf_model, save_checkpoint

from nanokv.engine import Engine
from nanokv.loader import load_config, load_model
from nanokv.models import linear
from nanokv.policies import make_policy

ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_onednn_bf16 = pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN has no bf16 on this CPU")
PROMPTS = [[5, 17, 88, 130, 9, 44, 250, 31, 7, 66, 12, 99, 143, 8, 201, 77, 3, 45, 60], [11, 42, 7]]


@pytest.mark.parametrize(
    ("dtype", "device", "native", "onednn", "expected"),
    [
        (torch.bfloat16, "cpu", True, True, True),
        (torch.bfloat16, "cpu", False, True, False),  # bf16 emulated: auto picks fp32 there
        (torch.bfloat16, "cpu", True, False, False),  # no oneDNN bf16 kernels
        (torch.float32, "cpu", True, True, False),
        (torch.float16, "cpu", True, True, False),
        (torch.bfloat16, "cuda", True, True, False),
    ],
)
def test_weights_are_packed_only_for_bf16_where_the_cpu_and_onednn_do_bf16(
    monkeypatch, dtype, device, native, onednn, expected
):
    monkeypatch.setattr(linear, "half_is_native", lambda device_type: native)
    monkeypatch.setattr(linear, "onednn_does_bf16", lambda: onednn)
    assert linear.packs_weights(dtype, torch.device(device)) is expected
    layout = linear.WeightLayout.for_machine(dtype, torch.device(device))
    assert layout.pack is expected and (layout.name == "onednn-packed") is expected


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


@needs_onednn_bf16
@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "opt", "opt-post-ln"])
def test_a_packed_model_decodes_as_the_dense_one(kind, tmp_path):
    """prepare_weights packed, then not, then packed: every read switches to a packed
    copy and back; packed, the weights only `linear` reads are held once (no dense parameter),
    and switching back restores the checkpoint's values; prefill and decode logits agree with
    the dense bf16 model's up to bf16 rounding (one row goes through another GEMV kernel)."""
    path = save_checkpoint(make_hf_model(kind), tmp_path)
    cfg = load_config(path)
    model = load_model(path, cfg, torch.bfloat16, torch.device("cpu"))
    model.prepare_weights(linear.WeightLayout())
    original = {name: p.clone() for name, p in model.named_parameters()}
    dense_bytes = sum(p.nbytes for p in original.values())
    engine = Engine(model, cfg, make_policy("full"), prefill_chunk=5)
    results = {}
    for pack in (True, False, True):
        model.prepare_weights(linear.WeightLayout(pack=pack))
        assert (model.head_read is not None) is pack
        assert all(read.is_mkldnn is pack for read in _reads(model))
        assert model.layout.name == ("onednn-packed" if pack else "output-major")
        held = dict(model.named_parameters())
        assert set(held) < set(original) if pack else set(held) == set(original)
        assert all(torch.equal(held[name], original[name]) for name in held)
        if pack:
            assert sum(p.nbytes for p in held.values()) < dense_bytes
        state, prefill = engine.start(PROMPTS, 4)
        results[pack] = (prefill, engine.step(state, prefill.argmax(-1)))
    for packed_logits, dense_logits in zip(results[True], results[False], strict=True):
        scale = dense_logits.abs().max()
        assert (packed_logits - dense_logits).abs().max() < 0.02 * scale


@needs_onednn_bf16
def test_the_bytes_a_step_reads_are_counted_alike_packed_or_not(tiny_llama_dir):
    cfg = load_config(tiny_llama_dir)
    model = load_model(tiny_llama_dir, cfg, torch.bfloat16, torch.device("cpu"))
    e2e = load_bench("e2e")
    model.prepare_weights(linear.WeightLayout(pack=True))
    packed_bytes = e2e.nanokv_weight_bytes(model)
    model.prepare_weights(linear.WeightLayout())
    assert e2e.nanokv_weight_bytes(model) == packed_bytes


def test_a_released_weight_without_its_packed_copy_is_refused():
    layer = torch.nn.Linear(4, 4)
    layer.weight = None
    with pytest.raises(ValueError, match="needs the packed copy"):
        linear.lay_out(layer, False)
