"""A conversation's memory of whole turns (nanokv/turn_memory.py): the units a conversation's
spans make, their ranking with the best weight each has had, and the recompression that keeps
the same sinks, units and latest positions in every (layer, kv head) -- each against a
brute-force reference of the rule."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import make_hf_model, save_checkpoint

import nanokv
from nanokv.engine import Engine
from nanokv.sentences import sentence_index
from nanokv.turn_memory import TurnMemory

SINKS = 4


def reference_units(starts, sentence_of, room, recent, sinks=SINKS) -> list[int]:
    """The units of `TurnMemory.units`, one position at a time."""
    n = len(sentence_of)
    tail, unit = max(n - recent, 0), [-1] * n
    for a, b in zip(starts, [*starts[1:], n], strict=True):
        lo, hi = max(a, sinks), min(b, tail)
        for p in range(lo, hi):
            if b <= tail and hi - lo <= room:
                unit[p] = lo
            elif sentence_of[p] >= 0:
                first = p
                while first > lo and sentence_of[first - 1] == sentence_of[p]:
                    first -= 1
                unit[p] = first
    return unit


def reference_weight(scores, positions, valid, n, sinks=SINKS) -> list[float]:
    """Each position's mean over heads of the head's max-normalised score, cubed."""
    rows, weight = scores.shape[0], [0.0] * n
    for r in range(rows):
        held = {
            int(p): max(float(s), 0.0)
            for p, s, ok in zip(positions[r], scores[r], valid[r], strict=True)
            if ok and sinks <= int(p) < n
        }
        top = max(held.values(), default=0.0)
        for p, s in held.items():
            weight[p] += (s / top if top > 0 else 0.0) ** 3 / rows
    return weight


def reference_places(memory: dict, unit, weight, every_head, room) -> list[int]:
    """`TurnMemory.shared_places` given the units: each unit's best weight so far (`memory`,
    updated), units every head holds whole taken best first while they fit."""
    firsts = sorted({u for u in unit if u >= 0})
    ranked = []
    for first in firsts:
        members = [p for p, u in enumerate(unit) if u == first]
        now = max(weight[p] for p in members)
        memory[first] = max(memory.get(first, now), now)
        if all(every_head[p] for p in members):
            ranked.append((-memory[first], first, len(members)))
    places, taken = [-1] * len(unit), 0
    for _, first, size in sorted(ranked):
        if room - taken <= 0:
            break
        if size <= room - taken:
            for p in (p for p, u in enumerate(unit) if u == first):
                places[p], taken = taken, taken + 1
    return places


def random_case(rng: random.Random, n: int, rows: int = 6):
    """Spans, sentences, and every head's slots (most positions, a few missing in some heads)."""
    starts = sorted(rng.sample(range(1, n - 1), 5))
    starts = [0, *starts]
    sentence_of, sentence = [], 0
    for _ in range(n):
        sentence_of.append(sentence)
        sentence += rng.random() < 0.2
    sentence_of = [s if s < sentence_of[-1] else -1 for s in sentence_of]  # the open fragment
    positions = torch.full((rows, n), -1, dtype=torch.int64)
    for r in range(rows):
        held = [p for p in range(n) if p < SINKS or rng.random() < 0.95]
        positions[r, : len(held)] = torch.tensor(held)
    valid = positions >= 0
    scores = torch.rand(rows, n) ** 4
    return starts, sentence_of, positions, valid, scores


@pytest.mark.parametrize("seed", range(8))
def test_units_and_places_equal_the_brute_force_rule_across_recompressions(seed):
    rng = random.Random(seed)
    n, cache = 90, rng.choice([20, 30, 44])
    starts, sentence_of, positions, valid, scores = random_case(rng, n)
    memory, remembered = TurnMemory(0.6, SINKS), {}
    for start in starts:
        memory.begin_span(start)
    room = memory.room(cache)
    assert room == int(0.6 * (cache - SINKS))
    recent = cache - SINKS - room
    want_units = reference_units(starts, sentence_of, room, recent)
    sentences = torch.tensor(sentence_of)
    assert memory.units(sentences, room, recent).tolist() == want_units
    every_head = [all(p in set(row.tolist()) for row in positions) for p in range(n)]
    for _ in range(3):  # the same arena probed again, each time with other scores
        weight = reference_weight(scores, positions, valid, n)
        want = reference_places(remembered, want_units, weight, every_head, room)
        assert memory.shared_places(scores, positions, valid, sentences, cache).tolist() == want
        scores = torch.rand(scores.shape) ** 4


def test_a_unit_keeps_the_best_weight_it_ever_had():
    """Two spans that each fit, room for one: the first probe is sure of span A, the second
    mildly prefers span B; A stays, where the second probe alone would take B."""
    positions = torch.arange(16).view(1, -1)  # one head holds 0..15
    valid = torch.ones_like(positions, dtype=torch.bool)
    sentence_of = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, -1])
    memory = TurnMemory(0.5, SINKS)
    for start in (0, 4, 8, 12):  # spans: sinks, A = 4..7, B = 8..11, the latest
        memory.begin_span(start)
    cache = 12  # room int(0.5 * 8) = 4: one span; recent 4: positions 12..15 not ranked
    sure_of_a = torch.zeros(1, 16)
    sure_of_a[0, 5], sure_of_a[0, 9] = 1.0, 0.1
    places = memory.shared_places(sure_of_a, positions, valid, sentence_of, cache)
    assert (places >= 0).nonzero().flatten().tolist() == [4, 5, 6, 7]
    mild_b = torch.zeros(1, 16)
    mild_b[0, 5], mild_b[0, 9] = 0.5, 1.0
    places = memory.shared_places(mild_b, positions, valid, sentence_of, cache)
    assert (places >= 0).nonzero().flatten().tolist() == [4, 5, 6, 7]
    fresh = TurnMemory(0.5, SINKS)
    for start in (0, 4, 8, 12):
        fresh.begin_span(start)
    places = fresh.shared_places(mild_b, positions, valid, sentence_of, cache)
    assert (places >= 0).nonzero().flatten().tolist() == [8, 9, 10, 11]


def test_spans_must_follow_each_other():
    memory = TurnMemory(0.6, SINKS)
    memory.begin_span(0)
    memory.begin_span(7)
    with pytest.raises(ValueError, match="does not follow"):
        memory.begin_span(7)


@pytest.fixture(scope="module")
def long_llama_dir(tmp_path_factory):
    """The tiny Llama with room for a few turns of its byte-level tokens and their probe."""
    model = make_hf_model("llama")
    model.config.max_position_embeddings = 1024
    return save_checkpoint(model, tmp_path_factory.mktemp("long-llama"))


TURNS = (
    "Please remember this. The code is 4821. I will ask you later.",
    "The cat sat on the mat. A dog ran to the park! Was the sky blue? It rained all day.",
    "Summarise this. The river rose fast. The bridge held. Nobody was hurt.",
    "What was the code?",
)


def test_a_conversation_keeps_the_same_turns_and_latest_tokens_in_every_head(
    long_llama_dir, monkeypatch
):
    """laprox (sentences shared by default): after each answer every (layer, kv head) holds
    the same positions: the sinks, the units the reference ranks best under the probe's
    scores (with the memory carried across turns), and the latest positions, min(cache, seen)
    in all; the spans are the turns and answers as written."""
    probed = []
    probe_arena = Engine.probe_arena

    def spy(engine, state, probe, chunk=None):
        scores = probe_arena(engine, state, probe, chunk)
        arena = state.arena
        probed.append((scores.clone(), arena.pos[:, 0].clone(), arena.lengths[:, 0].clone()))
        return scores

    monkeypatch.setattr(Engine, "probe_arena", spy)
    llm = nanokv.LLM(long_llama_dir, policy="laprox", budget=0.5, min_cache=0, dtype="float32")
    conversation = llm.conversation(nanokv.SamplingParams(max_new_tokens=6, ignore_eos=True))
    spans, remembered, compressions = [], {}, 0
    for turn in TURNS:
        written = len(conversation._ids)
        output = conversation.send(turn)
        spans += [written, written + len(output.prompt_token_ids)]
        assert conversation._memory.span_starts == spans
        seen, arena = conversation.tokens_seen, conversation.state.arena
        if len(probed) == compressions:  # nothing to evict yet
            continue
        compressions += 1
        scores, pos, lengths = probed[-1]
        cache = round(0.5 * seen)
        room = int(0.6 * (cache - SINKS))
        ids = conversation._ids[:seen]
        units = reference_units(spans, list(sentence_index(llm.tokenizer, ids)), room,
                                cache - SINKS - room)  # fmt: skip
        rows_pos, rows_scores = pos.flatten(0, 1), scores.flatten(0, 1)
        rows_valid = torch.arange(pos.shape[-1]) < lengths.flatten().long().unsqueeze(-1)
        held = [set(row[ok].tolist()) for row, ok in zip(rows_pos, rows_valid, strict=True)]
        every_head = [all(p in h for h in held) for p in range(seen)]
        weight = reference_weight(rows_scores, rows_pos, rows_valid, seen)
        places = reference_places(remembered, units, weight, every_head, room)
        shared = [p for p in range(seen) if places[p] >= 0]
        rest = [p for p in range(seen - 1, SINKS - 1, -1) if places[p] < 0 and every_head[p]]
        latest = rest[: cache - SINKS - len(shared)]  # the most recent others still held
        want = sorted({*range(SINKS), *shared, *latest})
        assert len(want) == cache and len(shared) <= room
        assert len({tuple(sorted(h)) for h in held}) == 1  # every head held the same
        for layer in range(llm.config.num_layers):
            for head in range(llm.config.num_kv_heads):
                count = int(arena.lengths[layer, 0, head])
                got = arena.pos[layer, 0, head, :count].tolist()
                assert got == want
    assert compressions >= 2
