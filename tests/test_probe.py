"""KVzip's probe (observe="repeat"): built as kvpress builds it, scored in chunks exactly as a dense
reference scores it, never in the arena, read by the policies, and `LLM.compress`'s default."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import make_hf_model, save_checkpoint

import nanokv
from nanokv import probe as probe_module
from nanokv.arena import same_buffer
from nanokv.attention import prefill_attention
from nanokv.budget import Budget
from nanokv.cli import main
from nanokv.engine import Engine, InputError
from nanokv.eval.ask import Prompt, probe_for
from nanokv.kernels import prefill_scores
from nanokv.kernels.prefill_scores import window_attention
from nanokv.loader import load_config, load_model
from nanokv.policies import make_policy
from nanokv.policies.base import PolicyOptions, PromptLayer
from nanokv.policies.selection import select_prompt_tokens
from nanokv.probe import (
    REPEAT,
    REPEAT_PART,
    Probe,
    ProbeScores,
    ProbeSegment,
    repeat_probe,
)
from nanokv.tokenizer import Tokenizer

DOC = "the quick brown fox jumps over the lazy dog. hello world, a kv cache test. "
SPAN = 24  # several probe segments on a ~60-token document
NEW = 4


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir) -> Tokenizer:
    return Tokenizer(tiny_llama_dir)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    cfg = load_config(tiny_llama_dir)
    return load_model(tiny_llama_dir, cfg, torch.float32, torch.device("cpu")), cfg


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    path = save_checkpoint(make_hf_model("mistral"), tmp_path_factory.mktemp("mistral"))
    cfg = load_config(path)
    return load_model(path, cfg, torch.float32, torch.device("cpu")), cfg


@pytest.fixture(scope="module")
def document(tokenizer) -> tuple[list[int], Probe]:
    """A chat-template document (as `LLM.chat` prefills it) and its probe in several segments."""
    ids = tokenizer.encode_chat([{"role": "user", "content": DOC * 2}])
    return ids, repeat_probe(tokenizer, ids, span=SPAN)


def _engine(model, name: str, budget: float = 0.3, chunk: int = 16, **options) -> Engine:
    net, cfg = model
    policy = make_policy(name, **options)
    return Engine(net, cfg, policy, budget=Budget(budget), prefill_chunk=chunk)


def dense_reference(model, doc: list[int], probe: Probe) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchunked KVzip scores: each segment runs with the document as one dense causal sequence
    (explicit softmax), and its rows' softmax over the sinks, the span and the segment's keys
    gives, max over the rows, each span key's score per query head. Returns (L, H_q, n) scores
    and (L,) the RMS over every probe row of the attention output's norm."""
    net, cfg = model
    n, group = len(doc), cfg.num_heads // cfg.num_kv_heads
    scores = torch.zeros(cfg.num_layers, cfg.num_heads, n)
    out_square, rows = torch.zeros(cfg.num_layers), 0
    for seg in probe.segments:
        ids = torch.tensor(doc + seg.ids)
        pos = torch.arange(len(ids))
        sink = min(probe.sinks, seg.start)
        subset = torch.cat([torch.arange(sink), torch.arange(seg.start, seg.end), pos[n:]])
        diff = pos.view(-1, 1) - pos.view(1, -1)
        mask = diff >= 0
        if cfg.sliding_window is not None:
            mask &= diff < cfg.sliding_window
        h = net.embed(ids, pos)
        for layer, block in enumerate(net.blocks):
            q, k, v = block.qkv(h, pos)  # (T, H_q, D), (T, H_kv, D) x2
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            logits = torch.einsum("thd,shd->hts", q, k) * cfg.head_dim**-0.5  # (H_q, T, T)
            probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
            attn = torch.einsum("hts,shd->thd", probs, v).reshape(len(ids), -1)  # (T, H_q * D)
            sub = logits[:, n:][:, :, subset].masked_fill(~mask[n:][:, subset], float("-inf"))
            span = torch.softmax(sub, dim=-1)[:, :, sink : sink + seg.end - seg.start]
            target = scores[layer, :, seg.start : seg.end]
            scores[layer, :, seg.start : seg.end] = torch.maximum(target, span.amax(dim=1))
            out_square[layer] += (attn[n:] @ block.o_proj.weight.T).square().sum()
            h = block.finish(h, attn)
        rows += len(seg.ids)
    return scores, (out_square / rows).sqrt()


# --- the probe as kvpress builds it -------------------------------------------------------------


def test_chat_probe_continues_the_user_message_and_repeats_the_document(tokenizer, document):
    ids, probe = document
    prefix = tokenizer.encode("<|user|>", add_special_tokens=False)
    first = len(prefix)
    assert ids[:first] == prefix
    instruction = tokenizer.encode(REPEAT, add_special_tokens=False)
    tail = tokenizer.encode("</s><|assistant|>", add_special_tokens=False)
    spans = [(seg.start, seg.end) for seg in probe.segments]
    assert spans == [(s, min(s + SPAN, len(ids))) for s in range(first, len(ids), SPAN)]
    assert len(spans) >= 3
    assert probe.segments[0].ids == instruction + tail + ids[first : first + SPAN]
    second = probe.segments[1]
    part = tokenizer.encode(REPEAT_PART, add_special_tokens=False)
    start = first + SPAN
    assert second.ids == part + ids[start - 8 : start] + tail + ids[start : start + SPAN]
    whole = repeat_probe(tokenizer, ids)  # kvpress's span of 2048: one segment
    assert [(s.start, s.end) for s in whole.segments] == [(first, len(ids))]


def test_a_probe_of_held_positions_repeats_only_their_tokens(tokenizer, document):
    """`held` (a conversation's arena): the segments repeat the held tokens after the
    template's prefix, SPAN of them a segment, each span from its first held position to past
    its last, a later segment quoting the held tokens before it; all positions held is the
    plain probe."""
    ids, plain = document
    first = len(tokenizer.encode("<|user|>", add_special_tokens=False))
    held = [0, *range(first, len(ids), 2)]  # a prefix position (never repeated), every other
    probe = repeat_probe(tokenizer, ids, span=SPAN, held=held)
    repeated = held[1:]
    chunks = [repeated[i : i + SPAN] for i in range(0, len(repeated), SPAN)]
    assert len(chunks) >= 2
    assert [(s.start, s.end) for s in probe.segments] == [(c[0], c[-1] + 1) for c in chunks]
    instruction = tokenizer.encode(REPEAT, add_special_tokens=False)
    tail = tokenizer.encode("</s><|assistant|>", add_special_tokens=False)
    assert probe.segments[0].ids == instruction + tail + [ids[p] for p in chunks[0]]
    part = tokenizer.encode(REPEAT_PART, add_special_tokens=False)
    quoted = [ids[p] for p in chunks[0][-8:]]
    assert probe.segments[1].ids == part + quoted + tail + [ids[p] for p in chunks[1]]
    assert probe.sentence_of == plain.sentence_of  # sentences of the whole document
    assert repeat_probe(tokenizer, ids, span=SPAN, held=list(range(len(ids)))) == plain


def test_spans_shrink_to_keep_every_segment_inside_the_context(tokenizer):
    ids = tokenizer.encode_chat([{"role": "user", "content": DOC * 5}])  # ~115 tokens
    probe = repeat_probe(tokenizer, ids, context=256)
    assert len(probe.segments) > 1 and len(ids) + probe.longest <= 256
    first = len(tokenizer.encode("<|user|>", add_special_tokens=False))
    assert probe.segments[0].start == first and probe.segments[-1].end == len(ids)
    assert all(a.end == b.start for a, b in zip(probe.segments, probe.segments[1:], strict=False))
    with pytest.raises(ValueError, match="leaves no room for KVzip's probe"):
        repeat_probe(tokenizer, ids, context=len(ids) + 20)


def test_raw_probe_uses_a_newline_and_skips_the_bos(tokenizer):
    text_ids = tokenizer.encode(DOC, add_special_tokens=False)
    probe = repeat_probe(tokenizer, [1, *text_ids])  # 1: the tiny tokenizer's <s>
    (segment,) = probe.segments
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert (segment.start, segment.end) == (1, len(text_ids) + 1)
    assert segment.ids == tokenizer.encode(REPEAT, add_special_tokens=False) + newline + text_ids


# --- (b) chunked scoring equals a dense reference -----------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("chunk", [3, 7, 16, 512])
def test_chunked_probe_scores_equal_the_dense_reference(request, document, kind, chunk):
    """Chunk sizes that do not divide the segments included; Mistral's sliding window (7) is
    shorter than a segment."""
    model = request.getfixturevalue(kind)
    ids, probe = document
    expected, output_norm = dense_reference(model, ids, probe)
    record = _engine(model, "full", 1.0, chunk).record_prompt(ids, probe)
    for layer, recorded in enumerate(record.layers):
        assert recorded.probe_attention.shape == (model[1].num_heads, len(ids))
        torch.testing.assert_close(recorded.probe_attention, expected[layer], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            recorded.probe_output_norm, output_norm[layer], rtol=1e-4, atol=0
        )
    outside = torch.ones(len(ids), dtype=torch.bool)
    for seg in probe.segments:
        outside[seg.start : seg.end] = False
    assert (record.layers[0].probe_attention[:, outside] == 0).all()  # the template prefix


def dense_probe_scores(
    scores: ProbeScores,
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    segment: ProbeSegment,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> None:
    """The reference rule, materialised: folds the rows q (c, H_q, D) into `scores` as the max
    over the rows of each span key's probability in the causal softmax over the sinks, the span
    and the segment's keys (k: (n + r, H_kv, D), positions: (n + r,))."""
    n, c = scores.n, q.shape[0]
    sink = min(scores.sinks, segment.start)
    span = slice(segment.start, segment.end)
    keys = torch.cat([k[:sink], k[span], k[n:]])  # (K, H_kv, D)
    key_pos = torch.cat([positions[:sink], positions[span], positions[n:]])
    probs = window_attention(
        q.transpose(0, 1), keys.transpose(0, 1), scale=scale,
        query_positions=positions[-c:], key_positions=key_pos, sliding_window=sliding_window,
    )  # fmt: skip  # (H_q, c, K)
    seen = probs[:, :, sink : sink + segment.end - segment.start].amax(dim=1)  # (H_q, span)
    target = scores.attention[:, span]
    torch.maximum(target, seen, out=target)


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("tile_rows", [1, 3, None])
@pytest.mark.parametrize("span", [(0, 12), (6, 14)])
def test_attend_rows_equals_sdpa_and_the_dense_scores(monkeypatch, window, tile_rows, span):
    """The fused path (one set of logits for the rows' output and their scores) gives what the
    materialised reference gives: the output SDPA computes, the dense softmax's scores, over
    chunks of a segment; sinks or none; Mistral-like windows; tiles of 1 row, 3, all."""
    kv_heads, group, head_dim, n, r = 2, 3, 16, 14, 8
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(n + r, kv_heads, head_dim, generator=gen) * 2 for _ in range(2))
    q = torch.randn(r, kv_heads * group, head_dim, generator=gen) * 2  # the segment's rows
    pos = torch.arange(n + r)
    if tile_rows is not None:  # tile_elements // (group x keys): tile_rows rows in each chunk
        tile = functools.partial(prefill_scores.probe_attention, tile_elements=tile_rows * 3 * 22)
        monkeypatch.setattr(probe_module, "probe_attention", tile)
    segment = ProbeSegment([0] * r, *span)
    options = dict(scale=0.25, sliding_window=window)
    fused, split = (ProbeScores(kv_heads * group, n, "cpu", sinks=4, output=False) for _ in "ab")
    for start, end in [(0, 5), (5, r)]:  # two chunks: the second sees the first's keys
        keys, values, key_pos = k[: n + end], v[: n + end], pos[: n + end]
        want = prefill_attention(q[start:end], keys, values, pos[n + start : n + end], key_pos,
                                 **options)  # fmt: skip
        dense_probe_scores(split, q[start:end], keys, key_pos, segment, **options)
        got = fused.attend_rows(q[start:end], keys, values, key_pos, segment, **options)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.attention, split.attention, atol=1e-6, rtol=1e-5)
    assert (fused.attention[:, span[0] : span[1]] > 0).any()


def test_attend_rows_scores_exactly_when_the_scored_keys_are_far_below_the_row_max():
    """A document key outside the span with a huge logit: exp(x - row max) of every scored key
    underflows, so the tile scores from the scored keys' own softmax (the dense reference's)."""
    n, r, head_dim = 10, 3, 4
    k, v = torch.zeros(n + r, 1, head_dim), torch.randn(n + r, 1, head_dim)
    k[:, 0, 0] = torch.linspace(-1, 1, n + r)
    k[7, 0, 0] = 400.0  # outside the span [0, 5) and the segment's keys: not scored
    q = torch.ones(r, 1, head_dim)
    pos, segment = torch.arange(n + r), ProbeSegment([0] * r, 0, 5)
    fused, split = (ProbeScores(1, n, "cpu", sinks=4, output=False) for _ in "ab")
    got = fused.attend_rows(q, k, v, pos, segment, scale=1.0)
    dense_probe_scores(split, q, k, pos, segment, scale=1.0)
    torch.testing.assert_close(got, prefill_attention(q, k, v, pos[n:], pos, scale=1.0))
    assert (split.attention[:, :5] > 0.01).all()  # the span matters among the scored keys
    torch.testing.assert_close(fused.attention, split.attention, atol=0, rtol=1e-6)


def test_the_probe_does_not_change_the_documents_pass(llama, document):
    ids, probe = document
    engine = _engine(llama, "full", 1.0)
    plain, probed = engine.record_prompt(ids), engine.record_prompt(ids, probe)
    torch.testing.assert_close(plain.logits, probed.logits, atol=0, rtol=0)
    for a, b in zip(plain.layers, probed.layers, strict=True):
        assert a.k.shape == b.k.shape == (llama[1].num_kv_heads, len(ids), llama[1].head_dim)
        torch.testing.assert_close(a.k, b.k, atol=0, rtol=0)
        torch.testing.assert_close(a.v, b.v, atol=0, rtol=0)


# --- (a) the probe never reaches the arena ------------------------------------------------------


@pytest.mark.parametrize("name", ["snapkv", "laprox", "tova"])
def test_the_arena_holds_only_document_tokens_as_planned(llama, document, name):
    """Every kept slot holds the K/V of a document position (< n) exactly as a full-cache prefill
    computed it; per-head lengths and the capacity are those of the same policy observing 'last'
    (uniform) or sum to the same total (laprox's global selection)."""
    ids, probe = document
    n = len(ids)
    full, _ = _engine(llama, "full", 1.0).start([ids], NEW)
    repeat = _engine(llama, name, observe="repeat")
    state, _ = repeat.start([ids], NEW, probes=[probe])
    last, _ = _engine(llama, name).start([ids], NEW)
    arena, lengths = state.arena, state.arena.lengths
    assert arena.capacity == last.arena.capacity
    if name == "laprox":
        plan = repeat.eviction.plan(n, NEW)
        assert (
            int(lengths.sum())
            == int(last.arena.lengths.sum())
            == plan.layer_counts[0] * (lengths.numel())
        )
    else:
        assert torch.equal(lengths, last.arena.lengths)
    for layer in range(lengths.shape[0]):
        for head in range(lengths.shape[2]):
            held = int(lengths[layer, 0, head])
            pos = arena.pos[layer, 0, head, :held].long()
            assert (pos >= 0).all() and (pos < n).all() and len(set(pos.tolist())) == held
            want_k = full.arena.k[layer, 0, head, pos]  # full cache: slot j holds position j
            torch.testing.assert_close(arena.k[layer, 0, head, :held], want_k, atol=0, rtol=0)
            want_v = full.arena.v[layer, 0, head, pos]
            torch.testing.assert_close(arena.v[layer, 0, head, :held], want_v, atol=0, rtol=0)


# --- (c) the scores reach the policy ------------------------------------------------------------


def test_snapkv_keeps_the_top_of_the_reference_scores(llama, document):
    """observe='repeat' keeps, per head, the sinks then the best of the dense reference's scores
    (max over the group, no pooling, no recent window by REPEAT_DEFAULTS), and that differs from
    what the last prompt queries keep."""
    ids, probe = document
    engine = _engine(llama, "snapkv", observe="repeat")
    assert engine.policy.options.pool == 1 and engine.policy.options.observation_window == 0
    assert engine.policy.options.max_head_share == 20.0  # no head cap, as KVzip
    assert _engine(llama, "snapkv").policy.options.max_head_share == 4.0  # observe="last"
    state, _ = engine.start([ids], NEW, probes=[probe])
    reference, _ = dense_reference(llama, ids, probe)
    cfg = llama[1]
    group = cfg.num_heads // cfg.num_kv_heads
    plan = engine.eviction.plan(len(ids), NEW)
    last, _ = _engine(llama, "snapkv").start([ids], NEW)
    differs = False
    for layer in range(cfg.num_layers):
        scores = reference[layer].view(cfg.num_kv_heads, group, -1).amax(dim=1)
        count = plan.layer_counts[layer]
        want = select_prompt_tokens(scores, count, sinks=4, window=0)  # (H_kv, count)
        kept = state.arena.pos[layer, 0, :, :count].long().sort(dim=-1).values
        assert torch.equal(kept, want)
        other = last.arena.pos[layer, 0, :, :count].long().sort(dim=-1).values
        differs |= not torch.equal(kept, other)
    assert differs


def test_recorded_probe_fills_the_arena_as_a_live_probe(llama, document):
    ids, probe = document
    engine = _engine(llama, "laprox", observe="repeat")
    live, live_logits = engine.start([ids], NEW, probes=[probe])
    record = _engine(llama, "full", 1.0).record_prompt(ids, probe)
    shared, shared_logits = engine.start([ids], NEW, records=[record])
    assert torch.equal(live.arena.lengths, shared.arena.lengths)
    assert same_buffer(live.arena.pos, shared.arena.pos)
    torch.testing.assert_close(live.arena.k, shared.arena.k, atol=0, rtol=0)
    torch.testing.assert_close(live_logits, shared_logits, atol=0, rtol=0)


def test_laprox_weights_the_probe_by_value_output_norms():
    """score = max over the group of a[h, j] ||v_j W_O^h||, over the RMS probe output norm."""
    torch.manual_seed(0)
    kv_heads, group, n = 2, 3, 20
    attention, norms = torch.rand(kv_heads * group, n), torch.rand(kv_heads * group, n) + 0.5
    prompt = PromptLayer(
        layer=0, seq=0, k=torch.zeros(kv_heads, n, 4), v=torch.zeros(kv_heads, n, 4),
        positions=torch.arange(n), window_queries=torch.zeros(kv_heads * group, 1, 4), scale=0.5,
        value_norms=norms, probe_attention=attention, probe_output_norm=torch.tensor(2.0),
    )  # fmt: skip
    policy = make_policy("laprox", observe="repeat")
    assert policy.options.pool == 1 and policy.options.allocation == "global"
    want = (attention * norms).view(kv_heads, group, n).amax(dim=1) / 2.0
    torch.testing.assert_close(policy.prefill_scores(prompt), want)
    snap = make_policy("snapkv", observe="repeat").prefill_scores(prompt)
    torch.testing.assert_close(snap, attention.view(kv_heads, group, n).amax(dim=1))


def test_every_caller_builds_the_probe_with_the_policys_sinks(tiny_llama_dir):
    """LLM.compress, the scheduler, conversations and the eval all take the probe from
    Engine.probes: the policy's own sinks, clipped to the model's context."""
    llm = nanokv.LLM(tiny_llama_dir, policy="snapkv", budget=0.3, min_cache=0)
    llm.configure("snapkv", budget=0.3, observe="repeat", sinks=7)
    engine, ids = llm.engine, llm.tokenizer.encode(DOC)
    (probe,) = engine.probes(llm.tokenizer, [ids])
    context = llm.config.max_position_embeddings
    assert probe == repeat_probe(llm.tokenizer, ids, sinks=7, context=context)
    assert probe != repeat_probe(llm.tokenizer, ids, context=context)  # default sinks: 4
    prompt = Prompt("context", ids, [])
    assert probe_for(engine, llm.tokenizer, prompt) == probe
    llm.configure("snapkv", budget=0.3, observe="last")
    assert llm.engine.probes(llm.tokenizer, [ids]) is None


# --- (d) LLM.compress observes 'repeat' by default, generate does not --------------------------


def test_compress_uses_the_probe_by_default_and_generate_does_not(tiny_llama_dir, monkeypatch):
    seen: list[tuple[str, object]] = []
    start_steps = Engine.start_steps  # every live prefill: compress's start, generate's requests

    def spy(engine, prompts, max_new_tokens, decode_window=None, probes=None):
        seen.append((engine.policy.options.observe, probes))
        return start_steps(engine, prompts, max_new_tokens, decode_window, probes)

    monkeypatch.setattr(Engine, "start_steps", spy)
    llm = nanokv.LLM(tiny_llama_dir, policy="laprox", budget=0.3, min_cache=0)
    assert llm.policy.options.observe == "last" and llm.policy.options.pool == 31
    assert llm.compress_policy.options.observe == "repeat" and llm.compress_policy.options.pool == 1
    context = llm.compress(DOC, max_question_tokens=32, max_new_tokens=4)
    observe, probes = seen[-1]
    want = repeat_probe(
        llm.tokenizer, context.token_ids, context=llm.config.max_position_embeddings
    )
    assert observe == "repeat" and probes == [want]
    assert int(context.state.arena.lengths.max()) < len(context.token_ids)  # compressed
    llm.chat("what jumps?", context=context, max_new_tokens=2)
    llm.generate(DOC, max_new_tokens=2)
    assert seen[-1] == ("last", None)
    llm.configure("laprox", budget=0.3, observe="last")  # an explicit choice holds for compress
    llm.compress(DOC, max_question_tokens=32, max_new_tokens=4)
    assert seen[-1] == ("last", None)
    llm.configure("h2o", budget=0.3)  # no observation window: compress runs it as it is
    assert llm.compress_engine is llm.engine
    llm.compress(DOC, max_question_tokens=32, max_new_tokens=4)
    assert seen[-1] == ("last", None)
    llm.configure("snapkv", budget=0.3, observe="repeat")
    llm.generate(DOC, max_new_tokens=2)
    assert seen[-1][0] == "repeat" and isinstance(seen[-1][1][0], Probe)


def test_cli_observe_flag(tiny_llama_dir, capsys):
    argv = ["generate", "--model", str(tiny_llama_dir), "--max-new-tokens", "2", "--budget", "0.5"]
    assert main([*argv, "--policy", "snapkv", "--observe", "repeat", DOC]) == 0
    assert main([*argv, "--policy", "h2o", "--observe", "repeat", DOC]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "observe='repeat'" in err[0] and err[0].startswith("nanokv: error:")
    with pytest.raises(SystemExit):
        main([*argv, "--policy", "snapkv", "--observe", "first", DOC])


# --- (e) bad values -----------------------------------------------------------------------------


def test_bad_observe_values_are_clear_errors():
    with pytest.raises(ValueError, match="observe must be 'last'.*got 'first'"):
        PolicyOptions(observe="first")
    for name in ("full", "streaming", "h2o", "auv"):
        with pytest.raises(ValueError, match=f"policy '{name}' does not score from an observ"):
            make_policy(name, observe="repeat")
    with pytest.raises(ValueError, match="span must be >= 1"):
        repeat_probe(None, [1, 2, 3], span=0)


def test_engine_rejects_mismatched_probes(llama, document):
    ids, probe = document
    repeat = _engine(llama, "snapkv", observe="repeat")
    with pytest.raises(ValueError, match="give a probe for every prompt"):
        repeat.start([ids], NEW)
    with pytest.raises(ValueError, match="1 probes for 2 prompts"):
        repeat.start([ids, ids], NEW, probes=[probe])
    with pytest.raises(ValueError, match="observes 'last' and would not read the probe"):
        _engine(llama, "snapkv").start([ids], NEW, probes=[probe])
    record = repeat.record_prompt(ids, probe)
    with pytest.raises(ValueError, match="records carry their probe"):
        repeat.start([ids], NEW, records=[record], probes=[probe])
    with pytest.raises(ValueError, match="records made with a probe"):
        repeat.start([ids], NEW, records=[repeat.record_prompt(ids)])
    too_long = Probe((ProbeSegment([5] * 250, 0, len(ids)),))
    with pytest.raises(InputError, match="past the model's 256-token context"):
        repeat.start([ids], NEW, probes=[too_long])
