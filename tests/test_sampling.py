"""Sampling filters against brute force, seeded reproducibility, and stopping rules."""

from __future__ import annotations

import pytest
import torch

from nanokv.engine import Sequence
from nanokv.sampling import Sampler, SamplingParams, filtered_probabilities
from nanokv.stopping import StopChecker


def test_top_k_and_top_p_keep_the_brute_force_sets():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    probs = torch.softmax(logits, -1)[0]
    order = probs.argsort(descending=True).tolist()
    top_k = filtered_probabilities(logits, SamplingParams(temperature=1.0, top_k=3))[0]
    assert set(top_k.nonzero().flatten().tolist()) == set(order[:3])
    top_p = filtered_probabilities(logits, SamplingParams(temperature=1.0, top_p=0.8))[0]
    kept, mass = [], 0.0
    for token in order:  # smallest prefix of the sorted tokens whose mass reaches top_p
        kept.append(token)
        mass += float(probs[token])
        if mass >= 0.8:
            break
    assert set(top_p.nonzero().flatten().tolist()) == set(kept)
    torch.testing.assert_close(top_p.sum(), torch.tensor(1.0))


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    got = filtered_probabilities(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(got, torch.softmax(logits / 0.5, -1))


def test_greedy_and_seeded_sampling():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = Sampler(SamplingParams(), 3, torch.device("cpu"))
    assert torch.equal(greedy(logits), logits.argmax(-1))
    params = SamplingParams(temperature=1.0, seed=7)
    first = [Sampler(params, 3, torch.device("cpu"))(logits) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    draws = Sampler(params, 3, torch.device("cpu"))
    assert len({tuple(draws(logits).tolist()) for _ in range(20)}) > 1


@pytest.mark.parametrize(
    "bad",
    [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}, {"stop": [""]}],
)
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def _detok(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i) for i in ids)


def test_stop_string_truncates_and_is_never_streamed():
    checker = StopChecker(_detok, eos_token_ids=[25], stop=["cd"])
    seq, streamed = Sequence([0]), []
    for token in [0, 1, 2, 3, 4]:  # a b c d e
        streamed.append(checker.advance(seq, token, is_last=False))
        if seq.finish_reason:
            break
    assert seq.text == "ab" and "".join(streamed) == "ab"
    assert seq.finish_reason == "stop" and seq.token_ids == [0, 1, 2, 3]


def test_eos_and_length():
    checker = StopChecker(_detok, eos_token_ids=[25])
    seq = Sequence([0])
    checker.advance(seq, 1, is_last=False)
    checker.advance(seq, 25, is_last=False)
    assert seq.finish_reason == "stop" and seq.text == "b" and seq.token_ids == [1, 25]
    seq = Sequence([0])
    checker.advance(seq, 1, is_last=True)
    assert seq.finish_reason == "length"
    ignoring = StopChecker(_detok, eos_token_ids=[25], ignore_eos=True)
    seq = Sequence([0])
    ignoring.advance(seq, 25, is_last=False)
    assert seq.finish_reason is None


def test_llm_generate_batch_stops_per_sequence(tiny_llama_dir):
    import nanokv

    llm = nanokv.LLM(tiny_llama_dir)
    prompts = ["the quick brown fox", "hello"]
    outs = llm.generate(prompts, max_new_tokens=6)
    assert [o.prompt for o in outs] == prompts
    assert all(len(o.token_ids) == 6 and o.finish_reason == "length" for o in outs)
    alone = llm.generate(prompts[1], max_new_tokens=6)[0]
    assert alone.token_ids == outs[1].token_ids  # a prompt's output does not depend on the batch
    first_token_text = llm.tokenizer.decode(outs[0].token_ids[:2])
    stopped = llm.generate(prompts[0], max_new_tokens=6, stop=[first_token_text])[0]
    assert stopped.finish_reason == "stop" and stopped.text == ""
    sampled = [llm.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3) for _ in range(2)]
    assert [o.token_ids for o in sampled[0]] == [o.token_ids for o in sampled[1]]
