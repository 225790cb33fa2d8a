"""Weights laid out input-major (models/linear.py): same values, same parameters, no copies."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_bench
from tiny_models import make_hf_model, save_checkpoint
from torch import nn

from nanokv.loader import load_config, load_model
from nanokv.models import linear


@pytest.mark.parametrize(
    ("vendor", "dtype", "device", "expected"),
    [
        ("AuthenticAMD", torch.float32, "cpu", True),
        ("AuthenticAMD", torch.bfloat16, "cpu", False),
        ("AuthenticAMD", torch.float32, "cuda", False),
        ("GenuineIntel", torch.float32, "cpu", False),
        ("", torch.float32, "cpu", False),
    ],
)
def test_default_layout_is_input_major_for_fp32_on_amd_cpus(
    monkeypatch, vendor, dtype, device, expected
):
    monkeypatch.setattr(linear, "cpu_vendor", lambda: vendor)
    assert linear.input_major_default(dtype, torch.device(device)) is expected


def test_cpu_vendor_reads_proc_cpuinfo():
    vendor = linear.cpu_vendor()
    try:
        with open("/proc/cpuinfo") as info:
            text = info.read()
    except OSError:
        assert vendor == ""
        return
    assert (f": {vendor}\n" in text) if vendor else ("vendor_id" not in text)


def test_laid_out_keeps_values_and_shape():
    weight = torch.randn(12, 7)
    for input_major in (True, False):
        out = linear.laid_out(weight, input_major)
        assert torch.equal(out, weight) and out.shape == weight.shape
        assert linear.is_input_major(out) is input_major


def _storages(model: nn.Module) -> dict[int, int]:
    """Storage pointer -> bytes, over every parameter of the model."""
    return {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
    }


def test_only_weights_with_as_many_outputs_as_inputs_are_laid_out_input_major():
    assert linear.pays_input_major(torch.empty(960, 576))
    assert linear.pays_input_major(torch.empty(576, 576))
    assert not linear.pays_input_major(torch.empty(576, 1536))
    down = nn.Linear(16, 8)
    up = nn.Linear(8, 16)
    input_major = linear.WeightLayout(input_major=True)
    assert not linear.is_input_major(linear.lay_out(down, input_major))
    assert linear.is_input_major(linear.lay_out(up, input_major))
    weight, _ = linear.fuse_rows(nn.Linear(8, 4), nn.Linear(8, 4), layout=input_major)
    assert linear.is_input_major(weight) and weight.shape == (8, 8)


step_weights = load_bench("weight_layout").step_weights


@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "opt", "opt-post-ln"])
def test_switching_the_layout_keeps_every_weight_and_holds_each_once(kind, tmp_path):
    """Input-major, output-major, input-major again: every projection with at least as many
    outputs as inputs, and the head, change layout (the others stay output-major), hold the
    checkpoint's values, remain views of the fused tensors, and the model holds no more bytes
    than its parameters (nothing is kept twice)."""
    path = save_checkpoint(make_hf_model(kind), tmp_path)
    cfg = load_config(path)
    model = load_model(path, cfg, torch.float32, torch.device("cpu"))
    original = {name: p.clone() for name, p in model.named_parameters()}
    size = sum(p.numel() * p.element_size() for p in original.values())
    for input_major in (True, False, True):
        model.prepare_weights(linear.WeightLayout(input_major=input_major))
        read = step_weights(model)  # the fused projections and the head
        for weight in read:
            wide = weight.shape[0] >= weight.shape[1]
            assert linear.is_input_major(weight) is (input_major and wide), weight.shape
        by_storage = {w.untyped_storage().data_ptr(): w for w in read}
        for m in model.modules():
            if isinstance(m, nn.Linear):  # each projection in the layout of what it is read from
                source = by_storage.get(m.weight.untyped_storage().data_ptr(), m.weight)
                wide = source.shape[0] >= source.shape[1]
                assert linear.is_input_major(m.weight) is (input_major and wide)
        for name, parameter in model.named_parameters():
            assert torch.equal(parameter, original[name]), name
        attn = model.blocks[0].self_attn
        fused = attn.qkv_weight.untyped_storage().data_ptr()
        assert attn.q_proj.weight.untyped_storage().data_ptr() == fused
        assert sum(_storages(model).values()) == size
