"""Compress a context once, then ask it questions: the context-only setting of kvpress."""

from __future__ import annotations

import pytest
import torch

import nanokv
from nanokv.arena import LayerStack, same_buffer
from nanokv.context import split_context
from nanokv.engine import InputError

DOC = "the quick brown fox jumps over the lazy dog. hello world, a kv cache test. " * 6


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return nanokv.LLM(tiny_llama_dir)


def _greedy(llm, ids, steps):
    state, logits = llm.engine.start([ids], steps)
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits.argmax(-1)))
        logits = llm.engine.step(state, logits.argmax(-1))
    return tokens


def test_full_cache_context_equals_one_long_prompt(llm):
    llm.configure("full")
    context = llm.compress(DOC, chat=False, max_question_tokens=16, max_new_tokens=6)
    question = " hello world"
    out = llm.generate(question, context=context, max_new_tokens=6, ignore_eos=True)[0]
    ids = context.token_ids + context.question_ids(llm.tokenizer, question)
    assert out.token_ids == _greedy(llm, ids, 6)


def test_the_question_is_not_compressed_and_questions_are_independent(llm):
    llm.configure("snapkv", budget=12.0, observation_window=4, min_cache=0)
    context = llm.compress(DOC, chat=False, max_question_tokens=16, max_new_tokens=6)
    assert int(context.state.arena.lengths.max()) == 12
    question_ids = context.question_ids(llm.tokenizer, " the lazy dog")
    state = context.state.clone()
    llm.engine.extend(state, question_ids)
    assert (state.arena.lengths == 12 + len(question_ids)).all()  # nothing evicted
    assert int(context.state.arena.lengths.max()) == 12  # the context itself is untouched
    alone = llm.generate(" hello", context=context, max_new_tokens=5, ignore_eos=True)[0]
    both = llm.generate([" the lazy dog", " hello"], context=context, max_new_tokens=5,
                        ignore_eos=True)  # fmt: skip
    assert both[1].token_ids == alone.token_ids


def test_chat_split_puts_the_question_inside_the_user_message(llm):
    ids, suffix = split_context(llm.tokenizer, DOC, chat=True)
    question = " what jumps?"
    rendered = llm.tokenizer.apply_chat_template([{"role": "user", "content": DOC + question}])
    assert rendered.endswith(question + suffix)
    prefix = rendered[: -len(question + suffix)]
    assert llm.tokenizer.encode(prefix, add_special_tokens=False) == ids
    assert suffix == "</s><|assistant|>"


def _snapshot(context) -> dict[str, object]:
    """Copies of everything a compressed context holds: the arena's tensors, the positions,
    cache sizes and window counters, the policy's per-call memory, and the token ids."""
    state, arena = context.state, context.state.arena
    tensors = {
        "k": arena.k, "v": arena.v, "pos": arena.pos, "lengths": arena.lengths,
        "value_norms": arena.value_norms, "positions": state.positions,
        "cache_tokens": state.cache_tokens,
        **{f"slot_state.{name}": t for name, t in arena.slot_state.items()},
        **{f"memory.{name}": t for name, t in state.memory.items()},
    }  # fmt: skip
    copies = {name: None if t is None else t.clone() for name, t in tensors.items()}
    counters = {"filled": state.filled.tolist(), "window": state.window}  # on the host
    return {**copies, **counters, "token_ids": list(context.token_ids)}


def _assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    assert before.keys() == after.keys()
    for name, value in before.items():
        if torch.is_tensor(value) or isinstance(value, LayerStack):
            assert same_buffer(value, after[name]), name
        else:
            assert value == after[name], name


@pytest.mark.parametrize("policy", ["full", "laprox", "auv"])
def test_bad_context_inputs(llm, policy):
    """Rejected questions raise InputError and leave the compressed context exactly as it was:
    a valid question then answers as it does on a fresh context."""
    llm.configure(policy, budget=1.0 if policy == "full" else 12.0, min_cache=0)
    with pytest.raises(InputError):
        llm.compress("   ")
    context = llm.compress(DOC, chat=False, max_question_tokens=4, max_new_tokens=4)
    if policy != "full":
        assert int(context.state.arena.lengths.max()) < len(context.token_ids)  # compressed
    before = _snapshot(context)
    with pytest.raises(InputError, match="reserved"):
        llm.generate("hello world " * 5, context=context, max_new_tokens=4)
    _assert_same(before, _snapshot(context))
    with pytest.raises(InputError, match="empty"):
        llm.generate("  ", context=context, max_new_tokens=2)
    _assert_same(before, _snapshot(context))
    answer = llm.generate(" hello", context=context, max_new_tokens=4, ignore_eos=True)[0]
    _assert_same(before, _snapshot(context))  # a valid question works on a copy too
    fresh = llm.compress(DOC, chat=False, max_question_tokens=4, max_new_tokens=4)
    _assert_same(before, _snapshot(fresh))  # compression is deterministic
    expected = llm.generate(" hello", context=fresh, max_new_tokens=4, ignore_eos=True)[0]
    assert len(answer.token_ids) == 4
    assert answer.token_ids == expected.token_ids and answer.text == expected.text


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("policy", ["full", "snapkv", "laprox", "auv"])
def test_chunked_extension_equals_one_step_a_token(tmp_path_factory, kind, policy):
    """The question as one chunk against the arena gives the logits and the arena of feeding it
    one decode step at a time (Mistral: the sliding window is shorter than the question)."""
    from tiny_models import make_hf_model, save_checkpoint

    path = save_checkpoint(make_hf_model(kind), tmp_path_factory.mktemp(kind))
    budget = 1.0 if policy == "full" else 14.0
    llm = nanokv.LLM(path, policy=policy, budget=budget, min_cache=0, dtype="float32")
    context = llm.compress(DOC, chat=False, max_question_tokens=16, max_new_tokens=4)
    question = context.question_ids(llm.tokenizer, " the lazy dog jumps over the fox")
    chunked, stepped = context.state.clone(), context.state.clone()
    chunk_logits = llm.engine.extend(chunked, question)
    for token in question:
        step_logits = llm.engine.step(stepped, torch.tensor([token]))
    llm.engine.settle(stepped)  # the steps' deferred value norms and statistics
    torch.testing.assert_close(chunk_logits, step_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(chunked.arena.lengths, stepped.arena.lengths)
    assert same_buffer(chunked.arena.pos, stepped.arena.pos)
    torch.testing.assert_close(chunked.arena.k, stepped.arena.k, atol=1e-5, rtol=1e-5)
    assert torch.equal(chunked.positions, stepped.positions)
    if chunked.arena.value_norms is not None:
        torch.testing.assert_close(chunked.arena.value_norms, stepped.arena.value_norms)
