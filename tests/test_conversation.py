"""`Conversation`: a multi-turn chat in one arena, compressed after each answer.

(1) with nothing evicted it answers as `LLM.chat` on the whole history (the incremental template
and the carried-over arena are right); (2) compressed, every head holds the budget, and every
kept slot is a real token's K/V; (3) the probe's scores against the arena equal a dense
reference; (5) bad turns leave it as it was; (6) Ctrl-C (a KeyboardInterrupt from on_text) keeps
what was generated. The tiny random model writes byte soup that the tokenizer splits otherwise,
so the exact comparisons use `word_model`: the same model made to answer with whole words.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import make_hf_model, save_checkpoint

import nanokv
from nanokv.arena import KVArena
from nanokv.engine import Engine, InputError
from nanokv.probe import Probe, repeat_probe
from nanokv.sampling import SamplingParams
from nanokv.stopping import StopChecker

TURNS = ["hello world", "the quick brown fox", "a lazy dog", "kv cache test"]
NEW = 6
PARAMS = SamplingParams(max_new_tokens=NEW)


def save_word_model(path: Path) -> Path:
    """The tiny Llama whose greedy answers are whole-word tokens (" quick", " wor"), which the
    tokenizer splits back the same way, and whose EOS wins where " brown" would: answers then
    end both at EOS and at max_new_tokens."""
    from tokenizers import Tokenizer

    model = make_hf_model("llama")
    save_checkpoint(model, path)
    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab()
    words = sorted(i for t, i in vocab.items() if t[:1] == "Ġ" and len(t) > 2 and t[1:].isalpha())
    with torch.no_grad():
        head = model.lm_head.weight  # (vocab, hidden)
        keep = torch.zeros(head.shape[0], dtype=torch.bool)
        keep[words] = True
        head[~keep] = 0
        head[2] = head[vocab["Ġbrown"]] * 1.05  # 2: the tiny tokenizer's </s>
    return save_checkpoint(model, path)


@pytest.fixture(scope="module")
def word_dir(tmp_path_factory) -> Path:
    return save_word_model(tmp_path_factory.mktemp("tiny-words"))


def _history(turns: list[str], answers: list[str]) -> list[dict[str, str]]:
    pairs = [
        [{"role": "user", "content": t}, {"role": "assistant", "content": a}]
        for t, a in zip(turns, answers, strict=True)
    ]
    return [message for pair in pairs for message in pair]


# --- (1) nothing evicted: the answers of LLM.chat on the whole history -----------------------


@pytest.mark.parametrize(("policy", "budget"), [("full", 1.0), ("snapkv", 1.0), ("h2o", 500.0)])
def test_uncompressed_conversation_answers_as_chat_on_the_whole_history(word_dir, policy, budget):
    llm = nanokv.LLM(word_dir, policy=policy, budget=budget, min_cache=0)
    conversation = llm.conversation(PARAMS)
    answers, reasons = [], []
    for index, turn in enumerate(TURNS):
        history = [*_history(TURNS[:index], answers), {"role": "user", "content": turn}]
        out = conversation.send(turn)
        (want,) = llm.chat([history], PARAMS)
        assert out.token_ids == want.token_ids and out.text == want.text
        assert out.prompt_token_ids == want.prompt_token_ids[-len(out.prompt_token_ids) :]
        answers.append(out.text)
        reasons.append(out.finish_reason)
        # the arena saw the whole rendered conversation, token for token (less a pending one)
        rendered = llm.tokenizer.encode_chat(_history(TURNS[: index + 1], answers))
        seen = conversation.tokens_seen
        assert conversation._ids[:seen] == rendered[:seen]
        assert int(conversation.state.arena.lengths.min()) == seen  # nothing evicted
    assert set(reasons[:-1]) == {"stop", "length"}  # both kinds of ending carried over


def test_an_answer_the_tokenizer_splits_otherwise_is_kept_as_generated(tiny_llama_dir):
    """The random model's byte soup is not how the tokenizer splits its text: the arena keeps
    the model's own tokens and the next turn is the text the template adds after the answer.
    The answers are those of a full-cache run over exactly those tokens."""
    llm = nanokv.LLM(tiny_llama_dir)
    conversation = llm.conversation(PARAMS)
    first = conversation.send(TURNS[0])
    second = conversation.send(TURNS[1])
    rendered = llm.tokenizer.encode_chat(_history(TURNS[:2], [first.text, second.text]))
    assert conversation._ids != rendered[: len(conversation._ids)]  # split otherwise
    tail = "</s><|user|>" + TURNS[1] + "</s><|assistant|>"
    assert second.prompt_token_ids == llm.tokenizer.encode(tail, add_special_tokens=False)
    eos = llm.eos_token_ids
    answer = first.token_ids[:-1] if first.token_ids[-1] in eos else first.token_ids
    ids = [*first.prompt_token_ids, *answer, *second.prompt_token_ids]
    stopper = StopChecker(llm.tokenizer.decode, eos)
    (expected,) = llm.engine.generate([ids], PARAMS, stopper)
    assert second.token_ids == expected.token_ids


def test_a_template_that_rewrites_earlier_turns_is_a_clear_error(tiny_llama_dir, tmp_path):
    model = tmp_path / "counting-template"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages | length }}" + config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    conversation = nanokv.LLM(model).conversation(PARAMS)
    conversation.send(TURNS[0])
    seen = conversation.tokens_seen
    with pytest.raises(InputError, match="renders the earlier turns differently"):
        conversation.send(TURNS[1])
    assert conversation.tokens_seen == seen and len(conversation.messages) == 2
    conversation.reset()
    assert conversation.send(TURNS[1]).token_ids  # a new conversation works


# --- (2) compressed: the budget per head, real tokens only -----------------------------------


class _Writes:
    """Every K/V the arena receives, by (layer, position): (H_kv, D) each."""

    def __init__(self, monkeypatch) -> None:
        self.k: dict[tuple[int, int], torch.Tensor] = {}
        self.v: dict[tuple[int, int], torch.Tensor] = {}
        append = KVArena.append

        def spy(arena, layer, k, v, positions, value_norms=None):
            key = (layer, int(positions[0]))
            assert key not in self.k, "a position written twice"
            self.k[key], self.v[key] = k[0].clone(), v[0].clone()
            return append(arena, layer, k, v, positions, value_norms)

        monkeypatch.setattr(KVArena, "append", spy)


@pytest.mark.parametrize(
    ("policy", "options", "budget", "floor"),
    [
        ("snapkv", {}, 12.0, 0),
        ("laprox", {}, 0.1, 20),  # the floor sets the cache
        ("tova", {}, 0.3, 0),
        ("streaming", {"observation_window": 4}, 12.0, 0),
        ("h2o", {"observation_window": 4}, 12.0, 0),
    ],
)
def test_compressed_arena_holds_the_budget_of_real_tokens(
    word_dir, monkeypatch, policy, options, budget, floor
):
    writes = _Writes(monkeypatch)
    exact = {"dtype": "float32"}  # K/V compared across two computations at 1e-5
    llm = nanokv.LLM(word_dir, policy=policy, budget=budget, min_cache=floor, **options, **exact)
    full = nanokv.LLM(word_dir, **exact)
    conversation = llm.conversation(PARAMS)
    cfg = llm.config
    for index, turn in enumerate(TURNS):
        conversation.send(turn)
        seen = conversation.tokens_seen
        cache = max(round(budget * seen) if budget <= 1 else int(budget), floor)
        arena = conversation.state.arena
        if policy == "laprox":  # global allocation: the heads share layers x heads x cache
            assert int(arena.lengths.sum()) == min(cache, seen) * arena.lengths.numel()
            share = llm.compress_engine.policy.options.max_head_share
            assert int(arena.lengths.max()) <= share * cache
            assert int(arena.lengths.min()) >= 4  # the sinks
        else:
            assert (arena.lengths == min(cache, seen)).all()
        state, _ = full.engine.start([conversation._ids[:seen]], 1)  # slot j: position j
        for layer in range(cfg.num_layers):
            for head in range(cfg.num_kv_heads):
                pos = arena.pos[layer, 0, head, : int(arena.lengths[layer, 0, head])].long()
                assert len(set(pos.tolist())) == len(pos) and int(pos.max()) < seen
                assert pos[:4].tolist() == [0, 1, 2, 3]  # the sinks
                if policy in ("streaming", "h2o"):  # the observation window, most recent
                    assert pos[-4:].tolist() == list(range(seen - 4, seen))
                for slot, p in enumerate(pos.tolist()):
                    assert torch.equal(arena.k[layer, 0, head, slot], writes.k[layer, p][head])
                    assert torch.equal(arena.v[layer, 0, head, slot], writes.v[layer, p][head])
                if layer == 0 or index == 0:  # no compression has reached these yet
                    want_k, want_v = (
                        state.arena.k[layer, 0, head, pos],
                        state.arena.v[layer, 0, head, pos],
                    )
                    torch.testing.assert_close(
                        arena.k[layer, 0, head, : len(pos)], want_k, atol=1e-5, rtol=1e-5
                    )
                    torch.testing.assert_close(
                        arena.v[layer, 0, head, : len(pos)], want_v, atol=1e-5, rtol=1e-5
                    )
        if policy == "streaming":  # recency: the most recent after the sinks
            assert arena.pos[0, 0, 0, : min(cache, seen)].tolist() == [
                0, 1, 2, 3, *range(seen - min(cache, seen) + 4, seen)
            ]  # fmt: skip


def test_the_probe_scores_decide_what_is_kept(word_dir, monkeypatch):
    """snapkv: each head keeps the sinks, then the best of the scores the probe gave its slots
    (ties by slot), in position order."""
    seen_scores: list[tuple[torch.Tensor, torch.Tensor]] = []
    probe_arena = Engine.probe_arena

    def spy(engine, state, probe, chunk=None):
        scores = probe_arena(engine, state, probe, chunk)
        seen_scores.append((scores.clone(), state.arena.pos[:, 0].clone()))
        return scores

    monkeypatch.setattr(Engine, "probe_arena", spy)
    llm = nanokv.LLM(word_dir, policy="snapkv", budget=12.0, min_cache=0)
    conversation = llm.conversation(PARAMS)
    for turn in TURNS:
        conversation.send(turn)
        scores, pos = seen_scores[-1]  # (L, H_kv, C) each, before the compaction
        for layer in range(llm.config.num_layers):
            for head in range(llm.config.num_kv_heads):
                valid = pos[layer, head] >= 0
                ranked = scores[layer, head].masked_fill(~valid | (pos[layer, head] < 4), -1)
                best = torch.argsort(-ranked, stable=True)[:8]
                want = sorted([0, 1, 2, 3, *pos[layer, head, best].tolist()])
                assert conversation.state.arena.pos[layer, 0, head, :12].tolist() == want
    assert len(seen_scores) == len(TURNS)


def test_between_turns_each_head_holds_only_what_it_kept(word_dir):
    """A global selection leaves a layer's heads at different counts: after each compression
    every such layer holds each head's kept slots only (`KVArena.pack_heads`), the others one
    rectangle as wide as they hold, and the next turn grows it back and answers. (Without
    shared sentences: with them every head keeps the same turns, tests/test_turn_memory.py.)"""
    llm = nanokv.LLM(word_dir, policy="laprox", budget=0.2, min_cache=0, sentences=0)
    conversation = llm.conversation(PARAMS)
    layers = range(llm.config.num_layers)
    for turn in TURNS:
        conversation.send(turn)
        arena = conversation.state.arena
        kept = arena.lengths.long()
        for layer in layers:
            if bool((kept[layer] != kept[layer].flatten()[0]).any()):
                assert torch.equal(arena.pages(layer).caps, kept[layer])
            else:
                assert arena.layer_capacity(layer) == int(kept[layer].max())
        assert conversation.stats().arena_bytes == arena.nbytes
    assert any(arena.pages(layer) is not None for layer in layers)


@pytest.mark.parametrize("policy", ["laprox", "snapkv"])
def test_each_recompression_probes_the_tokens_the_arena_holds(word_dir, monkeypatch, policy):
    """The probe after an answer repeats the tokens at the positions some head still holds
    (the turn memory's shared positions, or the union of the per-head cut's), not the whole
    conversation, so a recompression's pass is about the budget and the latest turn long."""
    calls: list[tuple[Probe, list[int]]] = []  # the probe and the positions held, a call
    recompress = Engine.recompress

    def spy(engine, state, cache, probe=None, information=None, memory=None):
        calls.append((probe, state.arena.held_positions(0)))
        return recompress(engine, state, cache, probe, information, memory)

    llm = nanokv.LLM(word_dir, policy=policy, budget=0.3, min_cache=0)
    monkeypatch.setattr(Engine, "recompress", spy)
    conversation = llm.conversation(PARAMS)
    for turn in TURNS:
        conversation.send(turn)
    ids = conversation._ids
    first = repeat_probe(llm.tokenizer, ids).segments[0].start  # after the template's prefix
    assert len(calls) == len(TURNS)
    for probe, held in calls:
        repeated = [p for p in held if p >= first]
        spans = [[p for p in repeated if s.start <= p < s.end] for s in probe.segments]
        assert [p for span in spans for p in span] == repeated
        for segment, span in zip(probe.segments, spans, strict=True):
            assert (segment.start, segment.end) == (span[0], span[-1] + 1)
            assert segment.ids[-len(span) :] == [ids[p] for p in span]
    assert len(calls[-1][1]) < conversation.stats().tokens_seen  # evicted: not repeated


def test_stats_count_what_the_arena_holds(word_dir):
    llm = nanokv.LLM(word_dir, policy="snapkv", budget=12.0, min_cache=0)
    conversation = llm.conversation(PARAMS)
    assert conversation.stats().tokens_seen == 0
    first = conversation.send(TURNS[0])
    stats = conversation.stats()
    cfg = llm.config
    seen = len(first.prompt_token_ids) + len(first.token_ids) - 1  # the last one is pending
    assert stats.tokens_seen == seen and stats.turns == 1
    assert (stats.kept_mean, stats.kept_min, stats.kept_max) == (12.0, 12, 12)
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * llm.dtype.itemsize
    assert stats.kv_bytes == 12 * per_token
    assert stats.full_cache_bytes == seen * per_token
    assert stats.arena_bytes == conversation.state.arena.nbytes
    assert f"tokens seen {seen}; kept per head: mean 12.0, min 12, max 12" in stats.line()


# --- (3) the probe against the arena equals a dense reference --------------------------------


def dense_arena_probe(llm, arena: KVArena, first: int, probe) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, H_q, C), (L,): every segment runs with explicit softmax, head by head, against the
    arena's valid slots of that head and itself (causal by position, Mistral's window); a slot's
    score for a query head is the max over the segment's rows of its probability among the
    sinks, the span's slots and the segment's keys. Second: per layer the RMS over every row
    of the attention output's norm after W_O."""
    net, cfg = llm.model, llm.config
    kv_heads, group = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    scores = torch.zeros(cfg.num_layers, cfg.num_heads, arena.capacity)
    square, rows = torch.zeros(cfg.num_layers), 0
    for seg in probe.segments:
        m = len(seg.ids)
        pos = torch.arange(first, first + m)
        h = net.embed(torch.tensor(seg.ids), pos)
        sink = min(probe.sinks, seg.start)
        for layer, block in enumerate(net.blocks):
            q, k, v = block.qkv(h, pos)  # (m, H_q, D), (m, H_kv, D) x2
            out = torch.zeros(m, cfg.num_heads, cfg.head_dim)
            for head in range(kv_heads):
                n = int(arena.lengths[layer, 0, head])
                slot_pos = arena.pos[layer, 0, head, :n].long()
                keys = torch.cat([arena.k[layer, 0, head, :n], k[:, head]])  # (n + m, D)
                values = torch.cat([arena.v[layer, 0, head, :n], v[:, head]])
                key_pos = torch.cat([slot_pos, pos])
                diff = pos.view(-1, 1) - key_pos.view(1, -1)
                visible = diff >= 0
                if cfg.sliding_window is not None:
                    visible &= diff < cfg.sliding_window
                in_span = (slot_pos < sink) | ((slot_pos >= seg.start) & (slot_pos < seg.end))
                scored = visible & torch.cat([in_span, torch.ones(m, dtype=torch.bool)])
                for member in range(group):
                    qh = head * group + member
                    logits = q[:, qh] @ keys.T * cfg.head_dim**-0.5  # (m, n + m)
                    out[:, qh] = _explicit_softmax(logits, visible) @ values
                    seen = _explicit_softmax(logits, scored)[:, :n].amax(dim=0)
                    scores[layer, qh, :n] = torch.maximum(scores[layer, qh, :n], seen)
            square[layer] += (out.reshape(m, -1) @ block.o_proj.weight.T).square().sum()
            h = block.finish(h, out.reshape(m, -1))
        rows += m
    return scores, (square / rows).sqrt()


def _explicit_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    top = logits.masked_fill(~mask, float("-inf")).amax(dim=-1, keepdim=True)
    weights = torch.exp(logits - top) * mask
    return weights / weights.sum(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> Path:
    return save_checkpoint(make_hf_model("mistral"), tmp_path_factory.mktemp("mistral"))


@pytest.mark.parametrize("policy", ["snapkv", "laprox"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize(("chunk", "held"), [(3, False), (7, False), (512, False), (7, True)])
def test_probe_scores_against_the_arena_equal_the_dense_reference(
    request, tiny_llama_dir, kind, chunk, held, policy
):
    """A ragged arena (heads hold different slots), a probe in several segments whose lengths
    the chunks do not divide; Mistral's window (7) is shorter than a segment. SnapKV's score is
    KVzip's (max over the GQA group); LaProx weights each query head by ||v_j W_O^h|| first and
    divides by the layer's RMS probe output norm, as at prefill. `held`: the probe repeats only
    the positions the arena holds (a conversation's), its spans with gaps."""
    model_dir = tiny_llama_dir if kind == "llama" else request.getfixturevalue("mistral_dir")
    llm = nanokv.LLM(model_dir, policy=policy, budget=12.0, min_cache=0, dtype="float32")
    engine = llm.compress_engine
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "the quick brown fox " * 4}])
    state = engine.empty_state(len(ids) + 4)
    engine.extend(state, ids)
    cfg, arena = llm.config, state.arena
    for layer in range(cfg.num_layers):  # keep every other slot, then a different count a head
        kept = torch.arange(0, len(ids), 2).expand(cfg.num_kv_heads, -1)
        counts = torch.tensor([kept.shape[1] - 3 * h for h in range(cfg.num_kv_heads)])
        arena.compact_sequence(layer, 0, kept, counts)
    span = 5 if held else 11  # held: half the tokens, still several segments
    probe = repeat_probe(
        llm.tokenizer, ids, span=span, held=arena.held_positions(0) if held else None
    )
    assert len(probe.segments) >= 2 and any(len(s.ids) % chunk for s in probe.segments)
    before = [t.clone() for t in (arena.k, arena.v, arena.pos, arena.lengths)]
    scores = engine.probe_arena(state, probe, chunk=chunk)
    per_query_head, output_norm = dense_arena_probe(llm, arena, len(ids), probe)
    if policy == "laprox":
        per_query_head = per_query_head * arena.value_norms[:, 0]
    group = cfg.num_heads // cfg.num_kv_heads
    expected = per_query_head.view(cfg.num_layers, cfg.num_kv_heads, group, -1).amax(dim=2)
    if policy == "laprox":
        expected = expected / output_norm.view(-1, 1, 1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    assert scores.amax() > 0 and (scores[..., int(arena.lengths.max()) :] == 0).all()
    for old, new in zip(before, (arena.k, arena.v, arena.pos, arena.lengths), strict=True):
        assert torch.equal(old, new)  # the probe only reads the arena


# --- (5) bad turns, (6) Ctrl-C ---------------------------------------------------------------


def _snapshot(conversation) -> dict[str, object]:
    arena = conversation.state.arena
    return {
        "ids": list(conversation._ids), "messages": list(conversation.messages),
        "positions": conversation.tokens_seen, "capacity": arena.capacity,
        "k": arena.k.clone(), "pos": arena.pos.clone(), "lengths": arena.lengths.clone(),
    }  # fmt: skip


def _assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    for name, value in before.items():
        same = torch.equal(value, after[name]) if torch.is_tensor(value) else value == after[name]
        assert same, name


@pytest.mark.parametrize(("policy", "too_many"), [("full", 230), ("snapkv", 110)])
def test_bad_turns_leave_the_conversation_as_it_was(word_dir, policy, too_many):
    """too_many new tokens fit after the turn alone, not after the conversation (snapkv keeps
    room for its probe)."""
    llm = nanokv.LLM(word_dir, policy=policy, budget=1.0 if policy == "full" else 12.0, min_cache=0)
    conversation = llm.conversation(PARAMS)
    conversation.send(TURNS[0])
    before = _snapshot(conversation)
    with pytest.raises(InputError, match="the turn is empty"):
        conversation.send("  \n")
    _assert_same(before, _snapshot(conversation))
    with pytest.raises(InputError, match="more than the model's 256-token context"):
        conversation.send("the quick brown fox jumps over the lazy dog " * 30)
    _assert_same(before, _snapshot(conversation))
    with pytest.raises(InputError, match="past the model's 256-token context.*/reset"):
        conversation.send(TURNS[1], SamplingParams(max_new_tokens=too_many))
    _assert_same(before, _snapshot(conversation))
    after = conversation.send(TURNS[1])
    clean = llm.conversation(PARAMS)
    clean.send(TURNS[0])
    assert after.token_ids == clean.send(TURNS[1]).token_ids


@pytest.mark.parametrize("policy", ["full", "snapkv"])
def test_keyboard_interrupt_keeps_what_was_generated(word_dir, policy):
    llm = nanokv.LLM(word_dir, policy=policy, budget=1.0 if policy == "full" else 12.0, min_cache=0)
    conversation = llm.conversation(SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    pieces: list[str] = []

    def stop_after_two(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 2:
            raise KeyboardInterrupt

    stopped = conversation.send(TURNS[0], on_text=stop_after_two)
    assert stopped.finish_reason == "interrupted"
    assert len(stopped.token_ids) == 2 and stopped.text == "".join(pieces)
    assert conversation.messages[-1] == {"role": "assistant", "content": stopped.text}
    assert conversation.tokens_seen == len(stopped.prompt_token_ids) + 1  # the 2nd is pending
    following = conversation.send(TURNS[1])
    assert following.finish_reason in ("stop", "length") and following.token_ids
    if policy == "full":  # the stopped answer is in the history as if it had ended there
        history = [*_history(TURNS[:1], [stopped.text]), {"role": "user", "content": TURNS[1]}]
        (want,) = llm.chat([history], conversation.params)
        assert following.token_ids == want.token_ids
    else:
        assert (conversation.state.arena.lengths == 12).all()


def test_arena_grow_keeps_every_slot():
    arena = KVArena(2, 1, 2, 3, 4, dtype=torch.float32, slot_state=("usage",), q_heads=4)
    arena.append(0, torch.ones(1, 2, 4), torch.ones(1, 2, 4), torch.tensor([5]), torch.ones(1, 4))
    k, pos = arena.k.clone(), arena.pos.clone()
    arena.grow(7)
    assert arena.capacity == 7 and arena.value_norms.shape[-1] == 7
    assert arena.slot_state["usage"].shape[-1] == 7 and arena.score is arena.slot_state["score"]
    assert torch.equal(arena.k[..., :3, :], k) and torch.equal(arena.pos[..., :3], pos)
    assert (arena.pos[..., 3:] == -1).all() and (arena.k[..., 3:, :] == 0).all()
    arena.grow(5)  # never shrinks
    assert arena.capacity == 7
