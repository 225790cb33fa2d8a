"""nanokv's logits equal transformers' on tiny random Llama / Mistral / OPT checkpoints."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CONFIGS, make_hf_model, save_checkpoint

from nanokv.arena import KVArena
from nanokv.engine import Engine
from nanokv.loader import load_config, load_model
from nanokv.models.linear import WeightLayout
from nanokv.policies import make_policy

PROMPTS = [[5, 17, 88, 130, 9, 44, 250, 31, 7, 66, 12, 99, 143, 8, 201, 77, 3, 45, 60], [11, 42, 7]]
DECODE_STEPS = 16
ATOL = 2e-4


def _engine(path, prefill_chunk=5, input_major: bool | None = None) -> Engine:
    """The full-cache engine of a checkpoint; `input_major` re-lays its weights out (None: the
    loader's choice for this machine)."""
    cfg = load_config(path)
    model = load_model(path, cfg, torch.float32, torch.device("cpu"))
    if input_major is not None:
        model.prepare_weights(WeightLayout(input_major=input_major))
    return Engine(model, cfg, make_policy("full"), prefill_chunk=prefill_chunk)


def _hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    kind = request.param
    hf_model = make_hf_model(kind)
    sharded = kind in ("llama", "opt")
    path = tmp_path_factory.mktemp(kind)
    save_checkpoint(hf_model, path, shard_size="40KB" if sharded else None)
    return kind, hf_model, path


def test_sharded_checkpoints_really_are_sharded(checkpoint):
    kind, _, path = checkpoint
    assert (path / "model.safetensors.index.json").exists() == (kind in ("llama", "opt"))


@pytest.mark.parametrize("input_major", [False, True], ids=["output-major", "input-major"])
def test_prompt_logits_match_transformers(checkpoint, input_major):
    _, hf_model, path = checkpoint
    engine = _engine(path, input_major=input_major)
    cfg = engine.cfg
    for prompt in PROMPTS:
        arena = KVArena(cfg.num_layers, 1, cfg.num_kv_heads, 32, cfg.head_dim, dtype=torch.float32)
        ours = engine.prefill(arena, 0, prompt, all_logits=True)
        torch.testing.assert_close(ours, _hf_logits(hf_model, prompt), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("input_major", [False, True], ids=["output-major", "input-major"])
def test_batched_greedy_decode_matches_transformers(checkpoint, input_major):
    """A batch of two prompts of different lengths, 16 greedy steps: every step's logits equal
    transformers' forward over the prompt plus the tokens generated so far, whichever way the
    weights are laid out (models/linear.py)."""
    _, hf_model, path = checkpoint
    engine = _engine(path, input_major=input_major)
    state, logits = engine.start(PROMPTS, DECODE_STEPS)
    steps = [logits]
    generated = [[] for _ in PROMPTS]
    for _ in range(DECODE_STEPS - 1):
        tokens = logits.argmax(-1)
        for seq, token in zip(generated, tokens.tolist(), strict=True):
            seq.append(token)
        logits = engine.step(state, tokens)
        steps.append(logits)
    for index, prompt in enumerate(PROMPTS):
        full = prompt + generated[index]
        reference = _hf_logits(hf_model, full)[len(prompt) - 1 :]
        ours = torch.stack([step[index] for step in steps])
        torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)


def test_mistral_sliding_window_is_honoured(tmp_path):
    """The prompt is longer than the window: without the window the logits would differ."""
    from tiny_models import mistral_config

    windowed = make_hf_model("mistral")
    unwindowed_config = mistral_config(sliding_window=None)
    unwindowed_config._attn_implementation = "eager"
    from transformers import AutoModelForCausalLM

    unwindowed = AutoModelForCausalLM.from_config(unwindowed_config).eval()
    unwindowed.load_state_dict(windowed.state_dict())
    prompt = PROMPTS[0]
    assert len(prompt) > windowed.config.sliding_window
    engine = _engine(save_checkpoint(windowed, tmp_path))
    cfg = engine.cfg
    arena = KVArena(cfg.num_layers, 1, cfg.num_kv_heads, 32, cfg.head_dim, dtype=torch.float32)
    ours = engine.prefill(arena, 0, prompt, all_logits=True)
    torch.testing.assert_close(ours, _hf_logits(windowed, prompt), atol=ATOL, rtol=1e-4)
    assert (ours - _hf_logits(unwindowed, prompt)).abs().max() > 1e-2


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_prefill_chunk_size_does_not_change_logits(tiny_llama_dir, monkeypatch, chunk):
    """A prompt prefilled in chunks of 1, 4 or 7 queries (4 and 7 do not divide its 19 tokens)
    gives the logits and the arena of one whole-prompt chunk; each engine really ran the
    chunks it was given (counted at the attention call)."""
    import nanokv.engine

    prompt = PROMPTS[0]
    whole = len(prompt)
    assert chunk < whole  # two different chunkings are compared, never one with itself
    calls = []
    attention = nanokv.engine.prefill_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[0])  # queries in this chunk
        return attention(q, *args, **kwargs)

    monkeypatch.setattr(nanokv.engine, "prefill_attention", counting)
    reference = _engine(tiny_llama_dir, prefill_chunk=whole)
    engine = _engine(tiny_llama_dir, prefill_chunk=chunk)
    cfg = engine.cfg
    arenas = [
        KVArena(cfg.num_layers, 1, cfg.num_kv_heads, 32, cfg.head_dim, dtype=torch.float32)
        for _ in range(2)
    ]
    ours = engine.prefill(arenas[0], 0, prompt, all_logits=True)
    sizes = [min(chunk, whole - start) for start in range(0, whole, chunk)]
    assert calls == sizes * cfg.num_layers
    calls.clear()
    theirs = reference.prefill(arenas[1], 0, prompt, all_logits=True)
    assert calls == [whole] * cfg.num_layers
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(arenas[0].k, arenas[1].k, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(arenas[0].v, arenas[1].v, atol=ATOL, rtol=1e-4)
    assert torch.equal(arenas[0].lengths, arenas[1].lengths)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(tiny_llama_dir, dtype):
    cfg = load_config(tiny_llama_dir)
    full = _engine(tiny_llama_dir)
    half_model = load_model(tiny_llama_dir, cfg, dtype, torch.device("cpu"))
    half = Engine(half_model, cfg, make_policy("full"), prefill_chunk=5)
    state32, logits32 = full.start(PROMPTS, 4)
    state16, logits16 = half.start(PROMPTS, 4)
    assert state16.arena.k.dtype == dtype
    tokens = logits32.argmax(-1)
    step32, step16 = full.step(state32, tokens), half.step(state16, tokens)
    assert logits16.dtype == torch.float32
    scale = logits32.abs().max()
    assert (logits16 - logits32).abs().max() < 0.1 * scale
    assert (step16 - step32).abs().max() < 0.1 * scale


def test_fused_projections_keep_the_checkpoint_names_and_hold_nothing_twice(checkpoint):
    """q/k/v (and gate/up) are read as one fused weight, yet the parameters keep the checkpoint's
    names and are views of the fused tensor, equal to what was loaded."""
    from nanokv.loader import checkpoint_tensors

    kind, hf_model, path = checkpoint
    model = _engine(path).model
    assert set(model.state_dict()) <= set(checkpoint_tensors(path))
    reference = hf_model.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], atol=0, rtol=0)
    attn = model.blocks[0].self_attn
    fused = [(attn.qkv_weight, (attn.q_proj, attn.k_proj, attn.v_proj))]
    if hasattr(model.blocks[0], "mlp"):
        mlp = model.blocks[0].mlp
        fused.append((mlp.gate_up_weight, (mlp.gate_proj, mlp.up_proj)))
    for weight, parts in fused:
        assert all(p.weight.untyped_storage().data_ptr() == weight.data_ptr() for p in parts)
        assert torch.equal(weight, torch.cat([p.weight for p in parts]))


def test_lm_head_reads_the_checkpoint_and_refines_the_top_logits_in_fp32(tiny_llama_dir):
    """The head is the checkpoint's memory in every dtype. fp32: exact logits. bf16: the GEMV's
    logits (rounded to bf16, or the C kernel's fp32 sums where the weights are in its blocks),
    except each row's REFINED_LOGITS largest, which are fp32 dot products of the bf16 weights,
    so the top of the distribution (and greedy's choice) is exact."""
    from nanokv.models.linear import REFINED_LOGITS

    cfg = load_config(tiny_llama_dir)
    model32 = load_model(tiny_llama_dir, cfg, torch.float32, torch.device("cpu"))
    assert model32.head.data_ptr() == model32.lm_head.weight.data_ptr()
    assert "head" not in model32.state_dict()
    model16 = load_model(tiny_llama_dir, cfg, torch.bfloat16, torch.device("cpu"))
    assert model16.head.data_ptr() == model16.lm_head.weight.data_ptr()
    assert cfg.vocab_size > 2 * REFINED_LOGITS
    for rows in (1, 3):  # one row takes the GEMV path, several the GEMM
        h = torch.randn(rows, cfg.hidden_size, dtype=torch.bfloat16)
        logits = model16.logits(h)
        expected = model16.model.norm(h).float() @ model16.lm_head.weight.float().T
        assert logits.dtype == torch.float32
        top = expected.topk(REFINED_LOGITS // 2, dim=-1).indices  # surely among the refined
        torch.testing.assert_close(logits.gather(-1, top), expected.gather(-1, top))
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
        rounding = expected.abs() * 2**-8 + 1e-6  # bf16 keeps 8 significant bits
        assert ((logits - expected).abs() <= rounding).all()
        if model16.layout.packing == "blocked":  # fp32 sums, in another order
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)
        else:
            assert (logits != expected).any()  # the tail really is the rounded GEMV


def test_rotary_tables_are_reused_only_for_the_same_positions(tiny_llama_dir):
    """Every layer of a step asks for the same tables; a step later the positions changed in
    place (the engine's `positions += 1`) and the tables must be recomputed."""
    from nanokv.models.rope import Rotary

    cfg = load_config(tiny_llama_dir)
    rotary = Rotary(cfg.rope, cfg.head_dim)
    positions = torch.tensor([3, 7])
    first = rotary.cos_sin(positions, torch.float32)
    assert rotary.cos_sin(positions, torch.float32)[0] is first[0]
    positions += 1
    again = rotary.cos_sin(positions, torch.float32)
    fresh = Rotary(cfg.rope, cfg.head_dim).cos_sin(torch.tensor([4, 8]), torch.float32)
    assert torch.equal(again[0], fresh[0]) and torch.equal(again[1], fresh[1])
    assert rotary.cos_sin(positions, torch.bfloat16)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rms_norm_equals_the_fused_kernel_bit_for_bit(dtype):
    """RMSNorm sends a half-precision input through the fp32 kernel (cheaper on CPU inside a
    decode step): the bits are those of F.rms_norm's own half-precision path."""
    from nanokv.models.llama import RMSNorm

    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, 1e-5)
    norm.weight.data = (torch.randn(64, generator=gen) * 2).to(dtype)
    norm.prepare()
    for scale in (1e-3, 1.0, 30.0, 1e3):
        x = (torch.randn(300, 64, generator=gen) * scale).to(dtype)
        fused = torch.nn.functional.rms_norm(x, (64,), norm.weight, 1e-5)
        assert torch.equal(norm(x), fused) and norm(x).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_by_roll_equals_rotate_half(tiny_llama_dir, dtype):
    """Rotary.apply rolls x by half the head against a signed sin: the products of HF's
    x * cos + rotate_half(x) * sin, exactly."""
    from nanokv.models.rope import Rotary

    cfg = load_config(tiny_llama_dir)
    rotary = Rotary(cfg.rope, cfg.head_dim)
    positions = torch.tensor([0, 5, 17, 400])
    x = torch.randn(4, 3, cfg.head_dim).to(dtype)
    cos, signed_sin = rotary.cos_sin(positions, dtype)
    angles = positions.float().unsqueeze(-1) * rotary.inv_freq
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)
    half = cfg.head_dim // 2
    rotate_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    want = x * angles.cos().to(dtype) + rotate_half * angles.sin().to(dtype)
    assert torch.equal(Rotary.apply(x, cos, signed_sin), want)
