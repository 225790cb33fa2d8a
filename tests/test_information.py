"""Self-information weighting (nanokv/information.py): each prompt token's -log p(x_j | x_<j)
equals transformers' per-token loss, the model-wide cut ranks score x information, a recorded
pass cuts as a live one does, and the option is on where it applies (LaProx under the probe)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import nanokv
from nanokv.budget import Budget
from nanokv.cli import main
from nanokv.engine import Engine
from nanokv.eviction import EvictionStage
from nanokv.information import token_information, weigh
from nanokv.policies import make_policy
from nanokv.policies.base import ProbedKeys
from nanokv.policies.laprox import LaProx
from nanokv.probe import repeat_probe
from nanokv.tokenizer import Tokenizer

DOC = "the quick brown fox jumps over the lazy dog. hello world, a kv cache test. " * 2
PROMPT = [(13 * i + 7) % 300 + 3 for i in range(90)]


@pytest.fixture(scope="module")
def document(tiny_llama_dir):
    tokenizer = Tokenizer(tiny_llama_dir)
    ids = tokenizer.encode_chat([{"role": "user", "content": DOC}])
    return ids, repeat_probe(tokenizer, ids, span=24)


def _engine(tiny_llama, policy) -> Engine:
    net, cfg = tiny_llama
    return Engine(net, cfg, policy, budget=Budget(0.3), prefill_chunk=16)


def _kept(state) -> list[list[set[int]]]:
    arena = state.arena
    return [
        [
            set(arena.pos[layer, 0, head, : int(arena.lengths[layer, 0, head])].tolist())
            for head in range(arena.lengths.shape[2])
        ]
        for layer in range(arena.lengths.shape[0])
    ]


def test_information_is_transformers_per_token_loss(tiny_llama_dir, tiny_llama):
    net, _ = tiny_llama
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        log_p = torch.log_softmax(hf(ids.view(1, -1)).logits[0].float(), dim=-1)
    want = -log_p[:-1].gather(-1, ids[1:].view(-1, 1)).squeeze(-1)  # (n - 1,)
    record = _engine(tiny_llama, make_policy("full")).record_prompt(PROMPT)
    information = record.information(net.logits)
    torch.testing.assert_close(information[1:], want, atol=1e-4, rtol=1e-4)
    assert information[0] == want.max()
    chunked = token_information(net.logits, record.hidden, ids, chunk=7)
    torch.testing.assert_close(chunked, information, atol=1e-5, rtol=1e-5)


def test_weigh_scales_prompt_slots_only():
    scores = torch.ones(2, 5)
    positions = torch.tensor([[0, 2, 3, -1, -2], [1, 4, 9, 3, -1]])  # 9: past the prompt
    information = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = weigh(scores, positions, information)
    assert got.tolist() == [[1.0, 3.0, 4.0, 1.0, 1.0], [2.0, 1.0, 1.0, 4.0, 1.0]]


class _PreWeighted(LaProx):
    """LaProx under the probe with its scores multiplied by given weights before any cut."""

    def __init__(self, weights: torch.Tensor, **options: object) -> None:
        self.weights = weights
        super().__init__(**options)

    def score_probe(self, keys: ProbedKeys) -> torch.Tensor:
        return super().score_probe(keys) * self.weights


def test_the_model_wide_cut_ranks_score_times_information(tiny_llama, document):
    net, _ = tiny_llama
    ids, probe = document
    weighted = _engine(tiny_llama, make_policy("laprox", observe="repeat", information=True))
    information = weighted.record_prompt(ids, probe=probe).information(net.logits)
    reference = _engine(tiny_llama, _PreWeighted(information, observe="repeat", information=False))
    plain = _engine(tiny_llama, make_policy("laprox", observe="repeat", information=False))
    kept = {}
    for name, engine in (("weighted", weighted), ("reference", reference), ("plain", plain)):
        state, _ = engine.start([ids], 4, probes=[probe])
        kept[name] = _kept(state)
    assert kept["weighted"] == kept["reference"]
    assert kept["weighted"] != kept["plain"]  # the weights changed what was kept


@pytest.mark.parametrize("allocation", ["global", "layerwise"])
def test_a_recorded_pass_cuts_as_the_live_prefill(tiny_llama, document, allocation):
    ids, probe = document
    policy = make_policy("laprox", observe="repeat", allocation=allocation, information=True)
    engine = _engine(tiny_llama, policy)
    live, logits = engine.start([ids], 4, probes=[probe])
    shared, logits_r = engine.start([ids], 4, records=[engine.record_prompt(ids, probe=probe)])
    assert _kept(live) == _kept(shared)
    torch.testing.assert_close(logits, logits_r, atol=0, rtol=0)


def test_information_is_a_choice_of_model_wide_cuts(tiny_llama_dir):
    assert not make_policy("laprox", observe="repeat").options.information  # off by default
    assert make_policy("laprox", observe="repeat", information=True).options.information
    with pytest.raises(ValueError, match="information weighs the scores at the model-wide cut"):
        make_policy("snapkv", information=True)
    with pytest.raises(ValueError, match="use allocation global or layerwise"):
        make_policy("laprox", allocation="layer", information=True)
    llm = nanokv.LLM(tiny_llama_dir, policy="laprox", budget=0.3, min_cache=0, information=True)
    assert llm.compress_policy.options.information and llm.policy.options.information


def test_cli_information_flag(tiny_llama_dir, capsys):
    argv = ["generate", "--model", str(tiny_llama_dir), "--max-new-tokens", "2", "--budget", "0.5"]
    assert main([*argv, "--policy", "laprox", "--observe", "repeat", "--information", DOC]) == 0
    assert main([*argv, "--policy", "laprox", "--no-information", DOC]) == 0
    assert main([*argv, "--policy", "laprox", "--information", DOC]) == 0
    assert main([*argv, "--policy", "snapkv", "--information", DOC]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("nanokv: error:") and "global" in err[0]


# --- a conversation's trail ---------------------------------------------------------------------


def _dense_information(hf, ids: list[int]) -> torch.Tensor:
    """(n - 1,) -log p(x_j | x_<j) of tokens 1.. of `ids` with everything in view."""
    tokens = torch.tensor(ids)
    with torch.no_grad():
        log_p = torch.log_softmax(hf(tokens.view(1, -1)).logits[0].float(), dim=-1)
    return -log_p[:-1].gather(-1, tokens[1:].view(-1, 1)).squeeze(-1)


def test_a_conversation_trails_each_tokens_information_by_position(tiny_llama_dir):
    """Turns (chunks), answers (decode steps) and the pending last answer token: with nothing
    evicted, the trail is the dense per-token loss of the conversation's tokens."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    llm = nanokv.LLM(  # fp32 as the reference: `auto` is bf16 on a CPU with bf16 instructions
        tiny_llama_dir, dtype="float32", policy="laprox", budget=1.0, information=True
    )
    conversation = llm.conversation(nanokv.SamplingParams(max_new_tokens=5, ignore_eos=True))
    conversation.send("the quick brown fox")
    conversation.send("jumps over the lazy dog")
    seen = conversation.tokens_seen
    trail = conversation._trail.values()
    assert trail.shape == (seen,)
    want = _dense_information(hf, conversation._ids[:seen])
    torch.testing.assert_close(trail[1:], want, atol=1e-4, rtol=1e-4)


def test_a_conversation_recompresses_on_score_times_information(tiny_llama_dir, monkeypatch):
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    probed, selected = [], []
    probe_arena, reselect = Engine.probe_arena, EvictionStage.reselect

    def probe_spy(engine, state, probe, chunk=None):
        probed.append((probe_arena(engine, state, probe, chunk), state.arena.pos[:, 0].clone()))
        return probed[-1][0]

    def reselect_spy(stage, arena, seq, scores, cache, seen):
        selected.append(scores.clone())
        return reselect(stage, arena, seq, scores, cache, seen)

    monkeypatch.setattr(Engine, "probe_arena", probe_spy)
    monkeypatch.setattr(EvictionStage, "reselect", reselect_spy)
    llm = nanokv.LLM(
        tiny_llama_dir, dtype="float32", policy="laprox", budget=0.3, min_cache=0,
        information=True, sentences=0,
    )  # fmt: skip
    conversation = llm.conversation(nanokv.SamplingParams(max_new_tokens=4, ignore_eos=True))
    conversation.send(DOC)
    ((scores, positions),), (ranked,) = probed, selected
    information = torch.ones(conversation.tokens_seen)
    information[1:] = _dense_information(hf, conversation._ids[: conversation.tokens_seen])
    information[0] = information[1:].max()
    torch.testing.assert_close(ranked, weigh(scores, positions, information), rtol=1e-4, atol=0)
