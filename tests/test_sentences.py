"""Shared sentences (nanokv/sentences.py): the document cut into sentences, the sentences ranked
and picked as a brute-force reference does, kept in every head by the model-wide cut with the
budget still exact, and on by default only where the query-agnostic probe cuts model-wide."""

from __future__ import annotations

import pytest
import torch

import nanokv
from nanokv import eviction as eviction_module
from nanokv.budget import Budget
from nanokv.cli import main
from nanokv.engine import Engine
from nanokv.policies import make_policy
from nanokv.policies.base import REPEAT_SENTENCES
from nanokv.probe import repeat_probe
from nanokv.sentences import sentence_index, shared_sentence_rank

SENTENCES = (
    "The cat sat on the mat. A dog ran to the park! Was the sky blue? "
    "The magic number is 4821.\nIt rained all day. The river rose fast. "
)


def test_sentence_index_cuts_after_end_marks_and_newlines(tiny_tokenizer):
    ids = tiny_tokenizer.encode("Hi there. How are you?\nFine! ok", add_special_tokens=False)
    index = sentence_index(tiny_tokenizer, ids)
    assert len(index) == len(ids) and index[0] == 0
    complete = [s for s in index if s >= 0]
    assert all(b - a in (0, 1) for a, b in zip(complete, complete[1:], strict=False))
    pairs = list(zip(ids, index, strict=True))
    texts = [tiny_tokenizer.decode([t for t, s in pairs if s == k]) for k in sorted(set(index))]
    assert [t.strip() for t in texts if t.strip()] == ["ok", "Hi there.", "How are you?", "Fine!"]
    finished = tiny_tokenizer.encode("Hi there. Fine!", add_special_tokens=False)
    assert -1 not in sentence_index(tiny_tokenizer, finished)


def reference_rank(scores, positions, valid, sentence_of, room, sinks) -> list[int]:
    """The rule of `shared_sentence_rank`, one entry at a time."""
    rows, slots = scores.shape
    n = len(sentence_of)
    weight = [0.0] * n
    for r in range(rows):
        held = {}
        for c in range(slots):
            p = int(positions[r, c])
            if valid[r, c] and sinks <= p < n:
                held[p] = max(held.get(p, 0.0), max(float(scores[r, c]), 0.0))
        top = max(held.values(), default=0.0)
        for p, s in held.items():
            weight[p] += (s / top if top > 0 else 0.0) ** 3 / rows  # cubed: SHARPNESS
    sentences = max(sentence_of) + 1
    best = [max(weight[p] for p in range(n) if sentence_of[p] == k) for k in range(sentences)]
    for p in range(min(sinks, n)):
        if sentence_of[p] >= 0:
            best[sentence_of[p]] = float("-inf")
    chosen = []
    for k in sorted(range(sentences), key=lambda k: -best[k]):  # stable: ties by sentence
        size = sentence_of.count(k)
        if room <= 0 or best[k] == float("-inf"):
            break
        if size <= room:
            chosen.append(k)
            room -= size
    places, taken = [-1] * n, 0
    for k in chosen:
        for p in range(n):
            if sentence_of[p] == k:
                places[p], taken = taken, taken + 1
    return places


def _renumbered(sentence_of: list[int]) -> list[int]:
    """Sentence ids 0, 1, ... in order (a sentence cut whole by the fragment leaves no gap)."""
    ids = {k: i for i, k in enumerate(dict.fromkeys(k for k in sentence_of if k >= 0))}
    return [ids.get(k, -1) for k in sentence_of]


@pytest.mark.parametrize("seed", range(6))
def test_shared_sentence_rank_equals_the_brute_force_rule(seed):
    gen = torch.Generator().manual_seed(seed)
    rows, slots, n, sinks = 6, 24, 40, 2
    sizes = torch.randint(1, 7, (n,), generator=gen).tolist()
    sentence_of = [k for k, size in enumerate(sizes) for _ in range(size)][:n]
    unfinished = int(torch.randint(0, 4, (), generator=gen))  # a fragment at the end: -1
    sentence_of = _renumbered([k if p < n - unfinished else -1 for p, k in enumerate(sentence_of)])
    scores = torch.rand(rows, slots, generator=gen) ** 3  # distinct values, no ties
    positions = torch.stack([torch.randperm(n, generator=gen)[:slots] for _ in range(rows)])
    valid = torch.rand(rows, slots, generator=gen) > 0.2
    positions[~valid & (torch.rand(rows, slots, generator=gen) > 0.5)] = -1  # empty slots
    room = int(torch.randint(0, 20, (), generator=gen))
    got = shared_sentence_rank(
        scores, positions, valid, torch.tensor(sentence_of), room=room, sinks=sinks
    )
    assert got.tolist() == reference_rank(scores, positions, valid, sentence_of, room, sinks)
    assert int((got >= 0).sum()) <= room


def test_a_sentence_one_head_is_sure_of_outranks_one_every_head_finds_mild():
    # sentences 0-1 (positions 0-1, 2-3) fit the room, sentence 2 (4-6) does not. Head 0's
    # largest score is on position 0, the other three heads' on position 4; every head scores
    # position 2 at 0.6 of its largest. Averaged plainly the mild sentence would be shared
    # (0.6 > 0.25); cubed, the one head 0 is sure of is (0.25 > 0.216)
    positions = torch.tensor([[0, 2, 4]] * 4)
    scores = torch.tensor([[1.0, 0.6, 0.0]] + [[0.0, 0.6, 1.0]] * 3)
    valid = torch.ones(4, 3, dtype=torch.bool)
    sentence_of = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    got = shared_sentence_rank(scores, positions, valid, sentence_of, room=2, sinks=0)
    assert got.tolist() == [0, 1, -1, -1, -1, -1, -1]


def test_options_share_sentences_only_under_the_probe_at_a_model_wide_cut():
    assert make_policy("laprox", observe="repeat").options.sentences == REPEAT_SENTENCES
    assert make_policy("laprox").options.sentences == 0.0  # question-aware: unchanged
    assert make_policy("snapkv", observe="repeat").options.sentences == 0.0  # uniform
    global_snapkv = make_policy("snapkv", observe="repeat", allocation="global")
    assert global_snapkv.options.sentences == REPEAT_SENTENCES
    assert make_policy("laprox", observe="repeat", sentences=0).options.sentences == 0.0
    # given with observe="last", it waits for `compress`'s probe (generate has no sentences)
    assert make_policy("laprox", sentences=0.5).options.sentences == 0.5
    with pytest.raises(ValueError, match="allocation global or layerwise"):
        make_policy("snapkv", observe="repeat", sentences=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        make_policy("laprox", observe="repeat", sentences=1.0)


def test_the_probe_carries_the_documents_sentences(tiny_tokenizer):
    ids = tiny_tokenizer.encode_chat([{"role": "user", "content": SENTENCES}])
    probe = repeat_probe(tiny_tokenizer, ids)
    assert probe.sentence_of == sentence_index(tiny_tokenizer, ids)


@pytest.mark.parametrize("allocation", ["global", "layerwise"])
def test_every_head_keeps_the_shared_sentences_and_the_budget_stays_exact(
    tiny_llama, tiny_tokenizer, monkeypatch, allocation
):
    net, cfg = tiny_llama
    ids = tiny_tokenizer.encode_chat([{"role": "user", "content": SENTENCES}])
    probe = repeat_probe(tiny_tokenizer, ids, span=24)  # inside the tiny model's context
    picked = []

    def spy(*args, **kwargs):
        picked.append(shared_sentence_rank(*args, **kwargs))
        return picked[-1]

    monkeypatch.setattr(eviction_module, "shared_sentence_rank", spy)
    kept = {}
    for share in (0.0, 0.5):
        policy = make_policy("laprox", observe="repeat", allocation=allocation, sentences=share)
        engine = Engine(net, cfg, policy, budget=Budget(0.4), prefill_chunk=16)
        state, _ = engine.start([ids], 2, probes=[probe])
        plan = engine.eviction.plan(len(ids), 2)
        lengths = state.arena.lengths[:, 0]  # (L, H_kv)
        assert int(lengths.sum()) == plan.layer_counts[0] * lengths.numel()  # exact budget
        kept[share] = [
            set(state.arena.pos[layer, 0, head, : int(lengths[layer, head])].tolist())
            for layer in range(cfg.num_layers)
            for head in range(cfg.num_kv_heads)
        ]
    assert len(picked) == 1  # sentences=0 never ranks them
    shared = set((picked[0] >= 0).nonzero().flatten().tolist())
    room = int(0.5 * plan.layer_counts[0])
    assert 0 < len(shared) <= room
    assert all(shared <= head for head in kept[0.5])
    assert not all(shared <= head for head in kept[0.0])  # the option is what keeps them


def test_compress_shares_sentences_by_default(tiny_llama_dir, monkeypatch):
    calls = []
    real = eviction_module.shared_sentence_rank

    def spy(*args, **kwargs):
        calls.append(kwargs.get("room", args[4] if len(args) > 4 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(eviction_module, "shared_sentence_rank", spy)
    llm = nanokv.LLM(tiny_llama_dir, policy="laprox", budget=0.3, min_cache=0, dtype="float32")
    llm.compress(SENTENCES, chat=False, max_question_tokens=8, max_new_tokens=4)
    assert len(calls) == 1 and calls[0] > 0


def test_a_conversation_keeps_whole_turns_instead_of_the_model_wide_sentence_rank(
    tiny_llama_dir, monkeypatch
):
    """A conversation's recompressions go through its turn memory (tests/test_turn_memory.py),
    not the model-wide cut's sentence rank, though its compress engine has the option."""
    calls = []
    monkeypatch.setattr(eviction_module, "shared_sentence_rank", lambda *a: calls.append(a))
    llm = nanokv.LLM(tiny_llama_dir, policy="laprox", budget=0.3, min_cache=0, dtype="float32")
    assert llm.compress_engine.policy.options.sentences == REPEAT_SENTENCES
    conversation = llm.conversation(nanokv.SamplingParams(max_new_tokens=4))
    assert conversation._memory.share == REPEAT_SENTENCES
    for turn in ("The cat sat on the mat. A dog ran!", "Was the sky blue? It rained."):
        conversation.send(turn)
    assert int(conversation.state.arena.lengths.max()) < conversation.tokens_seen  # compressed
    assert calls == []
    assert conversation._memory.span_starts[0] == 0 and len(conversation._memory.span_starts) == 4


def test_cli_sentences_flag(tiny_llama_dir, capsys):
    argv = ["generate", "--model", str(tiny_llama_dir), "--max-new-tokens", "2", "--budget", "0.5"]
    argv += ["--min-cache", "0"]
    assert main([*argv, "--observe", "repeat", "--sentences", "0.3", SENTENCES]) == 0
    assert main([*argv, "--observe", "repeat", "--sentences", "1.5", SENTENCES]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "sentences must be in [0, 1)" in err[0]
    assert main([*argv, "--policy", "snapkv", "--sentences", "0.3", SENTENCES]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "allocation global or layerwise" in err[0]
