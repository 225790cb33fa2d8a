"""Budget allocation across heads and layers: exact totals, floors, caps, and the kept sets of a
model-wide selection against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanokv.budget import Budget
from nanokv.engine import Engine
from nanokv.loader import load_config, load_model
from nanokv.policies import make_policy
from nanokv.policies.allocation import pyramid_budgets, select_across_rows, select_layer_widths

PROMPT = [(13 * i + 7) % 300 + 3 for i in range(60)]


@pytest.mark.parametrize(("mean", "layers"), [(50, 4), (10, 30), (7, 2), (100, 1)])
def test_pyramid_sums_to_the_uniform_total_and_decreases(mean, layers):
    budgets = pyramid_budgets(mean, layers, protected=4)
    assert sum(budgets) == mean * layers
    assert all(a >= b for a, b in zip(budgets[1:], budgets[2:], strict=False))
    assert min(budgets) >= 4 or mean < 4


@given(
    rows=st.integers(1, 5), n=st.integers(1, 12), data=st.data(),
)  # fmt: skip
@settings(max_examples=80, deadline=None)
def test_select_across_rows_equals_brute_force(rows, n, data):
    scores = torch.tensor(
        data.draw(st.lists(st.integers(0, 5), min_size=rows * n, max_size=rows * n)),
        dtype=torch.float32,
    ).view(rows, n)  # small integers: many ties
    protected = torch.zeros(rows, n, dtype=torch.bool)
    protected[:, : data.draw(st.integers(0, min(2, n)))] = True
    rank = torch.where(protected, torch.arange(n), -1)
    total = data.draw(st.integers(0, rows * n))
    floor = data.draw(st.integers(0, 2))
    cap = data.draw(st.integers(1, n))
    keep = select_across_rows(scores, rank, torch.ones_like(protected), total, floor=floor, cap=cap)
    # Brute force: each row's order (protected by position, then score desc, then position),
    # a guaranteed prefix, then a global pass over (score desc, row, position) within caps.
    want = torch.zeros(rows, n, dtype=torch.bool)
    order = []
    for r in range(rows):
        ranking = sorted(
            range(n),
            key=lambda j: (
                not protected[r, j],
                0.0 if protected[r, j] else -float(scores[r, j]),
                j,
            ),
        )
        guaranteed = min(max(int(protected[r].sum()), floor), cap)
        for j in ranking[:guaranteed]:
            want[r, j] = True
        order += [(-float(scores[r, j]), r, j) for j in ranking[guaranteed:cap]]
    for _, r, j in sorted(order)[: max(total - int(want.sum()), 0)]:
        want[r, j] = True
    assert torch.equal(keep, want)


@given(
    layers=st.integers(1, 3), heads=st.integers(1, 3), n=st.integers(1, 6), data=st.data(),
)  # fmt: skip
@settings(max_examples=80, deadline=None)
def test_layer_widths_are_the_best_widths_by_brute_force(layers, heads, n, data):
    """Every head of a layer keeps its own best w_l entries (protected first); the widths sum to
    the budget and maximise the kept score over every feasible choice of widths."""
    values = data.draw(st.lists(st.integers(0, 5), min_size=layers * heads * n,
                                max_size=layers * heads * n))  # fmt: skip
    scores = torch.tensor(values, dtype=torch.float32).view(layers, heads, n)
    sinks = data.draw(st.integers(0, min(1, n)))
    rank = torch.where(torch.arange(n) < sinks, torch.arange(n), -1).expand(layers, heads, n)
    valid = torch.ones(layers, heads, n, dtype=torch.bool)
    cap = data.draw(st.integers(max(sinks, 1), n))
    floor = data.draw(st.integers(0, 1))
    least = min(max(sinks, floor), cap)
    total = heads * data.draw(st.integers(layers * least, layers * cap))
    keep = select_layer_widths(scores, rank, valid, total, floor=floor, cap=cap)
    widths = keep.sum(dim=-1)  # (L, H)
    assert (widths == widths[:, :1]).all() and int(widths.sum()) == total
    best_of = []  # per layer, the kept score of each width: protected first, then by score
    for layer in range(layers):
        ranked = [sorted(scores[layer, h, sinks:].tolist(), reverse=True) for h in range(heads)]
        sink_score = float(scores[layer, :, :sinks].sum())
        best_of.append(
            {
                w: sink_score + sum(sum(r[: w - sinks]) for r in ranked)
                for w in range(least, cap + 1)
            }
        )
    feasible = [
        ws for ws in itertools.product(range(least, cap + 1), repeat=layers)
        if sum(ws) * heads == total
    ]  # fmt: skip
    best = max(sum(best_of[layer][w] for layer, w in enumerate(ws)) for ws in feasible)
    got = sum(float(scores[layer][keep[layer]].sum()) for layer in range(layers))
    assert got == pytest.approx(best)
    assert keep[..., :sinks].all()  # the protected entries are kept


def _engine(path, policy, budget, **options) -> Engine:
    cfg = load_config(path)
    model = load_model(path, cfg, torch.float32, torch.device("cpu"))
    policy = make_policy(policy, **options)
    return Engine(model, cfg, policy, budget=Budget(budget), prefill_chunk=16)


def _spy_scores(engine: Engine) -> dict[int, torch.Tensor]:
    recorded = {}
    original = engine.policy.prefill_scores

    def spy(prompt):
        scores = original(prompt)
        recorded[prompt.layer] = scores.clone()
        return scores

    engine.policy.prefill_scores = spy
    return recorded


@pytest.mark.parametrize("policy", ["laprox", "snapkv"])
def test_global_allocation_is_one_model_wide_top_k(tiny_llama_dir, policy):
    budget, sinks, window = 10, 2, 3
    engine = _engine(
        tiny_llama_dir, policy, float(budget), allocation="global", sinks=sinks,
        observation_window=window, max_head_share=3.0, pool=3,
    )  # fmt: skip
    scores = _spy_scores(engine)
    state, _ = engine.start([PROMPT], 4)
    lengths = state.arena.lengths[:, 0]  # (L, H_kv)
    assert int(lengths.sum()) == budget * lengths.numel()  # the total is exact
    assert len(set(lengths.flatten().tolist())) > 1  # heads really keep different counts
    assert state.arena.capacity == int(lengths.max()) + state.window  # shrunk to what was kept
    cap, n = 3 * budget, len(PROMPT)
    entries = []  # brute force: per head its top-`cap` (protected first), then a global top-k
    for layer, layer_scores in scores.items():
        for head, row in enumerate(layer_scores):
            ranking = sorted(
                range(n), key=lambda j: (not (j < sinks or j >= n - window), -float(row[j]), j)
            )[:cap]
            for j in ranking:
                prot = j < sinks or j >= n - window
                entries.append((not prot, -float(row[j]) if not prot else 0.0, layer, head, j))
    chosen = sorted(entries)[: budget * lengths.numel()]
    for layer in scores:
        for head in range(lengths.shape[1]):
            want = sorted(j for _, _, ly, hd, j in chosen if (ly, hd) == (layer, head))
            length = int(lengths[layer, head])
            got = state.arena.pos[layer, 0, head, :length].tolist()
            assert sorted(got) == want


def test_layer_allocation_and_floor(tiny_llama_dir):
    budget = 12
    engine = _engine(
        tiny_llama_dir, "snapkv", float(budget), allocation="layer", min_head_share=0.75
    )
    state, _ = engine.start([PROMPT], 4)
    lengths = state.arena.lengths[:, 0]
    assert (lengths.sum(dim=1) == budget * lengths.shape[1]).all()  # exact per layer
    assert int(lengths.min()) >= int(0.75 * budget)


@pytest.mark.parametrize("policy", ["laprox", "snapkv"])
def test_layerwise_allocation_gives_each_layer_one_width(tiny_llama_dir, policy):
    """Every head of a layer keeps the same count, the layers' counts differ and add up to the
    budget, and each layer's arena is exactly its width plus the decode window."""
    budget = 10
    engine = _engine(
        tiny_llama_dir, policy, float(budget), allocation="layerwise", max_head_share=3.0,
        observation_window=3, sinks=2,
    )  # fmt: skip
    state, _ = engine.start([PROMPT], 4)
    lengths = state.arena.lengths[:, 0]  # (L, H_kv)
    assert (lengths == lengths[:, :1]).all()
    assert int(lengths.sum()) == budget * lengths.numel()
    assert len(set(lengths[:, 0].tolist())) > 1  # the layers really differ
    for layer in range(lengths.shape[0]):
        assert state.arena.layer_capacity(layer) == int(lengths[layer, 0]) + state.window


def test_pyramid_allocation_keeps_the_schedule(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, "snapkv", 20.0, allocation="pyramid", observation_window=4)
    state, _ = engine.start([PROMPT], 4)
    lengths = state.arena.lengths[:, 0, 0].tolist()
    assert lengths == pyramid_budgets(20, len(lengths), protected=8)


@pytest.mark.parametrize("allocation", ["layer", "global"])
def test_decode_evictions_keep_each_heads_own_size(tiny_llama_dir, allocation):
    engine = _engine(tiny_llama_dir, "laprox", 8.0, allocation=allocation, decode_window=3)
    state, logits = engine.start([PROMPT], 12)
    after_prefill = state.arena.lengths.clone()
    for _ in range(11):
        logits = engine.step(state, logits.argmax(-1))
        grown = state.arena.lengths - after_prefill
        assert ((grown >= 0) & (grown <= 3)).all()
        assert len(set(grown.flatten().tolist())) == 1  # every head evicts in the same step
