"""A KV cache in a dtype of its own (nanokv/models/kv_dtype.py): an fp32 model whose arena,
attention and probe run in bf16, against fp32 arithmetic on the same rounded K/V."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_hf_model, save_checkpoint

import nanokv
from nanokv.cli import main
from nanokv.conversation import Conversation
from nanokv.dtypes import resolve_kv_dtype
from nanokv.models import kv_dtype, llama, opt, set_kv_dtype
from nanokv.serve.server import kv_bytes_for_tokens

PROMPT = [5 + (7 * i) % 300 for i in range(140)]
FORCED = [11, 42, 7, 99, 143, 8, 201, 77, 3, 45, 60, 12, 250, 31, 66, 130, 9, 44, 88, 17]


def teacher_forced(llm: nanokv.LLM) -> tuple[torch.Tensor, object]:
    """Logits (1 + len(FORCED), vocab) of PROMPT then FORCED fed one token a step, and the
    state: the same tokens whatever the dtype, so that logits compare row by row."""
    engine = llm.engine
    with torch.inference_mode():
        probes = engine.probes(llm.tokenizer, [PROMPT])
        state, logits = engine.start([PROMPT], len(FORCED) + 1, probes=probes)
        rows = [logits]
        for token in FORCED:
            rows.append(engine.step(state, torch.tensor([token])))
    return torch.cat(rows), state


def load(path, kv: str | None, policy: str = "full", budget: float = 1.0, **options):
    return nanokv.LLM(
        path, policy=policy, budget=budget, dtype="float32", kv_dtype=kv, min_cache=0, **options
    )


def rounded_like_bf16(monkeypatch) -> None:
    """Every block's q, k, v rounded to bf16 and back to fp32: the bf16 cache's values under
    fp32 arithmetic, the reference of the bf16 run."""

    def round_trip(dtype, *tensors):
        return tuple(t.to(torch.bfloat16).float() for t in tensors)

    monkeypatch.setattr(llama, "to_kv_dtype", round_trip)
    monkeypatch.setattr(opt, "to_kv_dtype", round_trip)


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, torch.float32), ("auto", torch.float32), ("bf16", torch.bfloat16),
     ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
def test_auto_is_the_model_dtype_and_a_name_is_taken_as_given(given, expected):
    assert resolve_kv_dtype(given, torch.float32) is expected
    assert resolve_kv_dtype(None, torch.bfloat16) is torch.bfloat16


@pytest.mark.parametrize("bad", ["int8", "fp8", torch.int8])
def test_an_unknown_kv_dtype_names_the_choices(bad):
    with pytest.raises(ValueError, match="choose auto .* float32, bfloat16 or float16"):
        resolve_kv_dtype(bad, torch.float32)


def test_set_kv_dtype_rounds_what_qkv_hands_out_and_finish_takes_any(tiny_llama):
    model, _ = tiny_llama
    h, positions = torch.randn(3, model.cfg.hidden_size), torch.arange(3)
    fp32 = model.blocks[0].qkv(h, positions)
    set_kv_dtype(model, torch.bfloat16)
    try:
        assert kv_dtype(model) is torch.bfloat16
        rounded = model.blocks[0].qkv(h, positions)
        for exact, half in zip(fp32, rounded, strict=True):
            assert half.dtype is torch.bfloat16 and torch.equal(half, exact.to(torch.bfloat16))
        attn = fp32[0].reshape(3, -1)
        out = model.blocks[0].finish(h, attn.to(torch.bfloat16))
        assert out.dtype is torch.float32
        torch.testing.assert_close(out, model.blocks[0].finish(h, attn.to(torch.bfloat16).float()))
    finally:
        set_kv_dtype(model, None)
    assert kv_dtype(model) is torch.float32 and model.blocks[0].kv_dtype is None
    set_kv_dtype(model, torch.float32)  # the weights' own dtype: no rounding at all
    assert model.blocks[0].kv_dtype is None


@pytest.mark.parametrize("kind", ["llama", "mistral", "opt"])
def test_a_bf16_cache_under_fp32_weights_is_fp32_arithmetic_on_rounded_kv(
    kind, tmp_path, monkeypatch
):
    """Full cache, teacher forced (Mistral with its sliding window): the bf16 cache holds half
    the bytes, and its logits are those of fp32 attention over the same rounded q, k, v, up to
    bf16's own arithmetic, and further from the unrounded fp32 model's."""
    path = save_checkpoint(make_hf_model(kind), tmp_path / kind)
    half, state = teacher_forced(load(path, "bfloat16"))
    exact, exact_state = teacher_forced(load(path, None))
    assert state.arena.k.dtype is torch.bfloat16 and exact_state.arena.k.dtype is torch.float32
    assert 2 * state.arena.k.element_size() == exact_state.arena.k.element_size()
    rounded_like_bf16(monkeypatch)
    reference, _ = teacher_forced(load(path, None))
    scale, off_reference = reference.abs().max(), (half - reference).abs().max()
    assert off_reference < 0.01 * scale  # measured 0.007 (llama), 0.004 (opt)
    assert off_reference < (half - exact).abs().max() < 0.05 * scale  # 0.025, 0.007


@pytest.mark.parametrize(
    "policy",
    ["streaming", "h2o", "snapkv", "tova", "auv", "laprox", "quest", "laprox+quest",
     "laprox:observe=repeat", "snapkv:observe=repeat"],
)  # fmt: skip
def test_every_policy_runs_on_a_bf16_cache(tiny_llama_dir, policy, monkeypatch):
    """Each policy evicts, attends (Quest's pages too) and scores (KVzip's probe too) in bf16
    as fp32 arithmetic does on the same rounded q, k, v: the same slots kept, and logits within
    bf16's own arithmetic of that reference's. Only KVzip's unweighted probe maxima
    (snapkv:observe=repeat) reorder near-ties on a random model (~1% of the slots), and a
    different kept set moves a tiny model's logits far: there only the kept count is held."""
    name, _, option = policy.partition(":")
    options = dict([option.split("=")]) if option else {}
    budget = 1.0 if name == "quest" else 0.5
    half, state = teacher_forced(load(tiny_llama_dir, "bfloat16", name, budget, **options))
    rounded_like_bf16(monkeypatch)
    reference, reference_state = teacher_forced(load(tiny_llama_dir, None, name, budget, **options))
    assert state.arena.k.dtype is torch.bfloat16
    assert reference_state.arena.k.dtype is torch.float32
    kept, reference_kept = kept_positions(state), kept_positions(reference_state)
    assert len(kept) == len(reference_kept)
    layers, _, kv_heads = state.arena.lengths.shape
    seen = layers * kv_heads * (len(PROMPT) + len(FORCED))
    assert name == "quest" or len(kept) < 0.6 * seen  # it evicted (Quest reads pages)
    if policy == "snapkv:observe=repeat":
        assert len(kept & reference_kept) / len(kept) > 0.97  # measured 0.993
        return
    assert kept == reference_kept
    off_reference = (half - reference).abs().max()
    assert off_reference < 0.02 * reference.abs().max()  # measured <= 0.011 (auv)


def kept_positions(state) -> set[tuple[int, int, int]]:
    """(layer, kv head, position) of every slot the arena holds."""
    kept = set()
    for layer in range(len(state.arena.lengths)):
        pos = state.arena.layer(layer).pos[0]  # (H_kv, C), -1 where empty
        for head, row in enumerate(pos.tolist()):
            kept |= {(layer, head, p) for p in row if p >= 0}
    return kept


def test_a_conversation_recompresses_a_bf16_cache(tiny_llama_dir):
    llm = load(tiny_llama_dir, "bfloat16", "laprox", 0.3)
    chat = Conversation(llm, nanokv.SamplingParams(max_new_tokens=6))
    for turn in ("hello there, remember 4821", "and what was the number?"):
        chat.send(turn)
    assert chat.state.arena.k.dtype is torch.bfloat16
    stats = chat.stats()
    assert stats.tokens_seen > 0 and 0 < stats.kept_mean < stats.tokens_seen


def test_a_bf16_cache_costs_the_pool_half_the_kv_bytes(tiny_llama_dir):
    """The pool's bytes a token: K and V at 2 bytes an element instead of 4, the slot metadata
    (positions) the same."""
    fp32, half = load(tiny_llama_dir, None), load(tiny_llama_dir, "bfloat16")
    cfg, tokens = fp32.config, 64
    kv_elements = 2 * tokens * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    saved = kv_bytes_for_tokens(fp32, tokens) - kv_bytes_for_tokens(half, tokens)
    assert saved == 2 * kv_elements


def test_generate_takes_kv_dtype_and_says_it(tiny_llama_dir, capsys):
    argv = ["generate", "--model", str(tiny_llama_dir), "--raw", "--max-new-tokens", "3"]
    assert main([*argv, "--dtype", "float32", "--kv-dtype", "bfloat16", "--verbose", "hi"]) == 0
    assert "dtype: float32 (given); KV cache: bfloat16" in capsys.readouterr().err.splitlines()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--kv-dtype", "int8", "hi"])
    assert exc.value.code == 2
    assert "--kv-dtype: invalid choice: 'int8'" in capsys.readouterr().err
