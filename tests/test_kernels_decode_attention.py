"""Decode attention: brute force == torch reference == Triton kernel (TRITON_INTERPRET=1 on CPU).

The brute force is deliberately naive: python loops, explicit logits in float64, softmax by hand.
Shapes are tiny (the interpreter is slow); block 16 and split 32 make several splits per head.
"""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are jitted, at first launch

import nanokv.kernels.decode_attention as decode_module  # noqa: E402
from nanokv.kernels.decode_attention import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    decode_attention_torch,
    decode_attention_triton,
    triton_available,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")
CAPACITY = 70  # not a multiple of the block (16) nor of the split (32)
KV_HEADS = 2


def make_case(group, head_dim, dtype, window, capacity=CAPACITY, seed=0):
    """Two sequences, two kv heads, ragged lengths 70 / 1 / 37 / 50, scattered slot positions."""
    gen = torch.Generator().manual_seed(seed)
    batch, q_heads = 2, KV_HEADS * group
    q = torch.randn(batch, q_heads, head_dim, generator=gen)
    k = torch.randn(batch, KV_HEADS, capacity, head_dim, generator=gen)
    v = torch.randn(batch, KV_HEADS, capacity, head_dim, generator=gen)
    lengths = torch.tensor([[capacity, 1], [37, 50]], dtype=torch.int32)
    # Kept tokens are scattered over the slots: positions are a permutation of a sparse range.
    slot_pos = torch.stack(
        [torch.randperm(2 * capacity, generator=gen)[:capacity] for _ in range(batch * KV_HEADS)]
    ).view(batch, KV_HEADS, capacity)
    # The last valid slot of every head holds the newest token, so a window never empties a head.
    slot_pos.scatter_(2, (lengths.long() - 1).unsqueeze(-1), 2 * capacity + 1)
    query_pos = torch.full((batch,), 2 * capacity + 2)
    norms = torch.rand(batch, q_heads, capacity, generator=gen) * 3
    case = dict(
        q=q.to(dtype),
        k=k.to(dtype),
        v=v.to(dtype),
        lengths=lengths,
        scale=1 / math.sqrt(head_dim),
        slot_pos=slot_pos.to(torch.int32),
        query_pos=query_pos,
        sliding_window=window,
        value_norms=norms,
    )
    return {name: t.to(DEVICE) if torch.is_tensor(t) else t for name, t in case.items()}


def brute_force_decode(
    q,
    k,
    v,
    lengths,
    *,
    scale,
    slot_pos=None,
    query_pos=None,
    sliding_window=None,
    value_norms=None,
    allowed=None,
):
    """Explicit logits and softmax per (sequence, query head); ``allowed(b, g, j)`` filters."""
    q, k, v = q.cpu().double(), k.cpu().double(), v.cpu().double()
    batch, q_heads, head_dim = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    out = torch.zeros(batch, q_heads, head_dim, dtype=torch.float64)
    mass = torch.zeros(batch, kv_heads, capacity, dtype=torch.float64)
    contribution = torch.zeros_like(mass)
    for b in range(batch):
        for h in range(q_heads):
            g = h // group
            slots = [
                j
                for j in range(int(lengths[b, g]))
                if (sliding_window is None or query_pos[b] - slot_pos[b, g, j] < sliding_window)
                and (allowed is None or allowed(b, g, j))
            ]
            logits = [scale * float(q[b, h] @ k[b, g, j]) for j in slots]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            total = sum(weights)
            for j, w in zip(slots, weights, strict=True):
                a = w / total
                out[b, h] += a * v[b, g, j]
                mass[b, g, j] += a
                if value_norms is not None:
                    contribution[b, g, j] += a * float(value_norms[b, h, j])
    return out, mass, contribution


TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
MASS_TOL = dict(atol=1e-5, rtol=1e-4)  # fp32 logits and statistics even for bf16 inputs
GRID = [
    pytest.param(group, head_dim, dtype, window, id=f"G{group}-D{head_dim}-{dtype_name}-w{window}")
    for group in (1, 3, 4)
    for head_dim in (64, 128)
    for dtype, dtype_name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    for window in (None, 40)
]


def assert_matches(out, emitted, expected_out, expected_mass, expected_contribution, dtype):
    """Output within the dtype's tolerance; emitted mass and contribution tight (fp32 math)."""
    assert out.dtype == dtype
    close = torch.testing.assert_close
    close(out.cpu().float(), expected_out.float(), **TOL[dtype])
    close(emitted.mass.cpu(), expected_mass.float(), **MASS_TOL)
    close(emitted.contribution.cpu(), expected_contribution.float(), **MASS_TOL)


@pytest.mark.parametrize("group, head_dim, dtype, window", GRID)
def test_reference_equals_brute_force(group, head_dim, dtype, window):
    case = make_case(group, head_dim, dtype, window)
    expected = brute_force_decode(**case)
    out, emitted = decode_attention_reference(**case, emit=True)
    assert_matches(out, emitted, *expected, dtype)


HALF_GRID = [
    pytest.param(group, dtype, window, emit, id=f"G{group}-{name}-w{window}-emit{emit}")
    for group in (1, 3)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"))
    for window in (None, 40)
    for emit in (False, True)
]


@pytest.mark.parametrize("group, dtype, window, emit", HALF_GRID)
def test_torch_path_equals_reference_in_half_precision(monkeypatch, group, dtype, window, emit):
    """The half-precision torch path (SDPA, or blocked fp32 logits when emitting; blocks of 16
    slots here, so five blocks a head) against the fp32 reference and the brute force."""
    monkeypatch.setattr(decode_module, "LOGIT_BLOCK", 16)
    case = make_case(group, 64, dtype, window)
    out, emitted = decode_attention_torch(**case, emit=emit)
    ref_out, ref = decode_attention_reference(**case, emit=True)
    if emit:
        assert_matches(out, emitted, ref_out, ref.mass, ref.contribution, dtype)
        assert_matches(out, emitted, *brute_force_decode(**case), dtype)
    else:
        assert emitted is None and out.dtype == dtype
        torch.testing.assert_close(out.float(), ref_out.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("window", [None, 40], ids=["no-window", "window"])
def test_output_does_not_depend_on_emission(dtype, window):
    """The output is the same bits with and without emission (a policy that keeps every token
    then decodes exactly as the full cache, which emits nothing)."""
    case = make_case(3, 64, dtype, window)
    plain, _ = decode_attention_torch(**case)
    emitting, _ = decode_attention_torch(**case, emit=True)
    assert torch.equal(plain, emitting)


def test_torch_path_in_fp32_is_the_reference_within_rounding():
    """fp32: SDPA's output within fp32 rounding of the reference's (not its bits: the fused
    kernel sums in another order); the emitted statistics are the reference's own bits."""
    case = make_case(3, 64, torch.float32, 40)
    out, emitted = decode_attention_torch(**case, emit=True)
    ref_out, ref = decode_attention_reference(**case, emit=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    assert torch.equal(emitted.mass, ref.mass)
    assert torch.equal(emitted.contribution, ref.contribution)


PREFIX_GRID = [
    pytest.param(lengths, dtype, emit, id=f"{name}-{'-'.join(map(str, sum(lengths, [])))}-{emit}")
    for lengths in ([[50, 50], [50, 50]], [[50, 12], [37, 50]], [[1, 1], [1, 1]])
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    for emit in (False, True)
]


@pytest.mark.parametrize("lengths, dtype, emit", PREFIX_GRID)
def test_torch_path_reads_only_the_attended_prefix(lengths, dtype, emit):
    """Without a window the torch path reads the slots below the longest head's length only,
    masked where heads differ and unmasked where they are equal, and emits zeros past it:
    slots past it hold NaN here (keys, values and value norms), which any read of them would
    spread into the output. The output is the same bits with and without emission. On the CPU:
    a GPU's lengths are not read (the whole capacity is attended under the mask there)."""
    case = {
        name: value.cpu() if torch.is_tensor(value) else value
        for name, value in make_case(3, 64, dtype, None).items()
    }
    case["lengths"] = torch.tensor(lengths, dtype=torch.int32)
    longest = max(max(row) for row in lengths)
    expected = brute_force_decode(**case)
    for name in ("k", "v"):
        case[name][:, :, longest:] = float("nan")
    case["value_norms"][..., longest:] = float("nan")
    out, emitted = decode_attention_torch(**case, emit=emit)
    assert out.dtype == dtype
    if emit:
        assert_matches(out, emitted, *expected, dtype)
        assert torch.equal(out, decode_attention_torch(**case)[0])
    else:
        assert emitted is None
        torch.testing.assert_close(out.cpu().float(), expected[0].float(), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("group, head_dim, dtype, window", GRID)
def test_triton_equals_reference(group, head_dim, dtype, window):
    case = make_case(group, head_dim, dtype, window)
    out, emitted = decode_attention_triton(**case, emit=True, block_n=16, split_size=32)
    ref_out, ref = decode_attention_reference(**case, emit=True)
    assert_matches(out, emitted, ref_out, ref.mass, ref.contribution, dtype)
    # Mass of every (sequence, kv head) sums to the group size: each query head's row sums to 1.
    torch.testing.assert_close(emitted.mass.sum(-1).cpu(), torch.full((2, KV_HEADS), group * 1.0))


@needs_triton
def test_triton_default_blocks_and_options():
    """Production block / split sizes (one split here), no emission, emission without norms."""
    case = make_case(3, 64, torch.float32, None)
    ref_out, ref = decode_attention_reference(**case, emit=True)
    out, none = decode_attention_triton(**case)
    assert none is None
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    case["value_norms"] = None
    out, emitted = decode_attention_triton(**case, emit=True)
    assert emitted.contribution is None
    torch.testing.assert_close(emitted.mass, ref.mass, **MASS_TOL)


@needs_triton
def test_triton_fp16():
    case = make_case(4, 128, torch.float16, 40)
    out, emitted = decode_attention_triton(**case, emit=True, block_n=16, split_size=32)
    ref_out, ref = decode_attention_reference(**case, emit=True)
    assert_matches(out, emitted, ref_out, ref.mass, ref.contribution, torch.float16)


@needs_triton
def test_triton_is_deterministic():
    case = make_case(4, 64, torch.bfloat16, 40)
    first = decode_attention_triton(**case, emit=True, block_n=16, split_size=32)
    second = decode_attention_triton(**case, emit=True, block_n=16, split_size=32)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1].mass, second[1].mass)
    assert torch.equal(first[1].contribution, second[1].contribution)


def spy_on(monkeypatch, module, names: tuple[str, ...]) -> list[str]:
    """Wraps the module's functions `names` (its implementations); returns the list of calls."""
    calls = []
    for name in names:
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def test_dispatcher_equals_brute_force_and_takes_this_devices_path(monkeypatch):
    """The public dispatcher against the naive float64 loops (not against either
    implementation), and the path it took: Triton on CUDA, the torch path elsewhere."""
    names = ("decode_attention_torch", "decode_attention_triton")
    calls = spy_on(monkeypatch, decode_module, names)
    case = make_case(3, 64, torch.float32, 40)
    out, emitted = decode_attention(**case, emit=True)
    assert out.device.type == DEVICE
    assert_matches(out, emitted, *brute_force_decode(**case), torch.float32)
    on_gpu = DEVICE == "cuda" and triton_available()
    assert calls == ["decode_attention_triton" if on_gpu else "decode_attention_torch"]


def test_dispatcher_never_takes_triton_for_cpu_tensors(monkeypatch):
    """CPU tensors go to the torch path even where Triton imports (the interpreter is a
    test device, not a production path)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the Triton kernel ran on CPU tensors")

    monkeypatch.setattr(decode_module, "decode_attention_triton", forbidden)
    case = {
        name: t.cpu() if torch.is_tensor(t) else t
        for name, t in make_case(1, 64, torch.float32, None).items()
    }
    out, emitted = decode_attention(**case, emit=True)
    assert out.device.type == "cpu"
    assert_matches(out, emitted, *brute_force_decode(**case), torch.float32)


def _bad(case, name, shape):
    """`case` with tensor `name` replaced by zeros of `shape` (same dtype and device)."""
    tensor = case[name]
    return {**case, name: torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)}


# (tensor, wrong shape, the message's expected shape); the case is B=2, H_q=6, H_kv=2, C=70, D=64
SHAPE_ERRORS = [
    ("k", (2, 2, 70, 32), "k must have shape (2, *, *, 64), got (2, 2, 70, 32)"),
    ("v", (2, 2, 69, 64), "v must have shape (2, 2, 70, 64), got (2, 2, 69, 64)"),
    ("lengths", (2, 3), "lengths must have shape (2, 2), got (2, 3)"),
    ("slot_pos", (2, 2, 71), "slot_pos must have shape (2, 2, 70), got (2, 2, 71)"),
    ("query_pos", (3,), "query_pos must have shape (2,), got (3,)"),
    ("value_norms", (2, 2, 70), "value_norms must have shape (2, 6, 70), got (2, 2, 70)"),
]


@pytest.mark.parametrize("name, shape, message", SHAPE_ERRORS, ids=[e[0] for e in SHAPE_ERRORS])
@pytest.mark.parametrize("run", ["dispatcher", "reference", "torch-bf16", "triton"])
def test_shape_errors_name_the_tensor_and_both_shapes(name, shape, message, run):
    """A ValueError (not an assert: `python -O` keeps it) before any kernel runs."""
    attend = {
        "dispatcher": decode_attention,
        "reference": decode_attention_reference,
        "torch-bf16": decode_attention_torch,
        "triton": decode_attention_triton,
    }[run]
    dtype = torch.bfloat16 if run == "torch-bf16" else torch.float32
    case = _bad(make_case(3, 64, dtype, 40), name, shape)
    with pytest.raises(ValueError, match=re.escape(message)):
        attend(**case, emit=True)


def test_layout_errors_of_the_triton_launcher():
    """Group size, dtypes, contiguity and block sizes: ValueErrors before any launch."""
    case = make_case(3, 64, torch.float32, None)
    four_heads = _bad(_bad(case, "k", (2, 4, 70, 64)), "v", (2, 4, 70, 64))
    with pytest.raises(ValueError, match="q's 6 query heads do not split into k's 4 kv heads"):
        decode_attention_triton(**{**four_heads, "lengths": case["lengths"].repeat(1, 2)})
    with pytest.raises(ValueError, match="k and v must share a dtype"):
        decode_attention_triton(**{**case, "v": case["v"].half()})
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention_triton(
            **{**case, "k": case["k"].transpose(2, 3).contiguous().transpose(2, 3)}
        )
    with pytest.raises(ValueError, match="block_n must be >= 16 and divide split_size"):
        decode_attention_triton(**case, block_n=16, split_size=40)


def test_shape_checks_survive_python_optimise():
    """Under `python -O` asserts vanish; the shape check must still raise."""
    code = (
        "import torch\n"
        "from nanokv.kernels.decode_attention import decode_attention\n"
        "q, k = torch.zeros(1, 2, 8), torch.zeros(1, 1, 4, 8)\n"
        "try:\n"
        "    decode_attention(q, k, k, torch.ones(1, 2, dtype=torch.int32), scale=1.0)\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "lengths must have shape (1, 1), got (1, 2)"


def test_window_without_positions_is_an_error():
    case = make_case(1, 64, torch.float32, 8)
    case["slot_pos"] = None
    with pytest.raises(ValueError, match="sliding window"):
        decode_attention_reference(**case)
