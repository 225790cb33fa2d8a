"""AUV against its paper's formulas: row-scaled aggregation, running mean (eq. 3-4), usage
counts, composite vector (eq. 5), usage decay (eq. 6), reconstructed K/V (eqs. 7-8)."""

from __future__ import annotations

import torch

from nanokv.arena import KVArena
from nanokv.budget import Budget
from nanokv.engine import Engine
from nanokv.eviction import EvictionStage
from nanokv.kernels.decode_attention import Emitted
from nanokv.loader import load_config, load_model
from nanokv.policies import PromptLayer, make_policy
from nanokv.reconstruct import RECONSTRUCTED_POS, fold_victims


def _brute_auv_scores(q, k, scale):
    """(H_kv, n): scale row i by N_i / N_max, average each column over the rows that see it,
    then average over the query heads of each kv head."""
    q_heads, n, _ = q.shape
    group = q_heads // k.shape[0]
    per_head = torch.zeros(q_heads, n)
    for h in range(q_heads):
        columns = [[] for _ in range(n)]
        for i in range(n):
            logits = torch.stack([q[h, i] @ k[h // group, j] * scale for j in range(i + 1)])
            row = torch.softmax(logits, 0) * (i + 1) / n
            for j in range(i + 1):
                columns[j].append(float(row[j]))
        per_head[h] = torch.tensor([sum(c) / len(c) for c in columns])
    return per_head.view(k.shape[0], group, n).mean(dim=1)


def test_prefill_scores_are_row_scaled_column_means():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 24, 8, generator=g), torch.randn(2, 24, 8, generator=g)
    prompt = PromptLayer(
        layer=0, seq=0, k=k, v=k.clone(), positions=torch.arange(24), window_queries=q[:, -4:],
        scale=8**-0.5, queries=q,
    )  # fmt: skip
    got = make_policy("auv").prefill_scores(prompt)
    torch.testing.assert_close(got, _brute_auv_scores(q, k, 8**-0.5), atol=1e-5, rtol=1e-4)
    state = make_policy("auv").prefill_state(prompt)
    assert state["score_count"][0].tolist() == [24 - j for j in range(24)]


def _arena_with(scores, usage, counts, pos):
    arena = KVArena(1, 1, 1, len(pos), 2, dtype=torch.float32, slot_state=("usage", "score_count"))
    arena.score[0, 0, 0] = torch.tensor(scores)
    arena.slot_state["usage"][0, 0, 0] = torch.tensor(usage)
    arena.slot_state["score_count"][0, 0, 0] = torch.tensor(counts)
    arena.pos[0, 0, 0] = torch.tensor(pos, dtype=torch.int32)
    arena.lengths[0, 0, 0] = len(pos)
    return arena


def test_decode_update_usage_composite_and_decay():
    policy = make_policy("auv", usage_top_k=2, usage_decay=0.5)
    policy.bind({"longest_row": torch.tensor([10.0])})  # the prompt had 10 tokens: N_max
    arena = _arena_with([0.2, 0.1, 0.4, 9.0], [1.0, 0.0, 2.0, 0.0], [3.0, 2.0, 1.0, 0.0],
                        [0, 5, 7, RECONSTRUCTED_POS])  # fmt: skip
    mass = torch.tensor([[[0.6, 0.3, 0.9, 0.2]]])  # a group of 2 query heads: sums to 2
    view = arena.layer(0)
    before = {name: t.clone() for name, t in arena.slot_state.items()}
    rows = policy.observe_decode(0, view, Emitted(mass=mass, contribution=None))
    assert all(torch.equal(arena.slot_state[n], t) for n, t in before.items())  # only returns
    EvictionStage(policy, Budget(1.0), 1).write_rows(arena, 0, rows)
    row = mass[0, 0] / 2 * 4 / 10  # group mean, scaled by N_i / N_max (eq. 3)
    want = [
        (float(row[j]) + s * c) / (c + 1) for j, s, c in [(0, 0.2, 3), (1, 0.1, 2), (2, 0.4, 1)]
    ]
    torch.testing.assert_close(view.score[0, 0, :3], torch.tensor(want))
    assert view.score[0, 0, 3] == 9.0  # the reconstructed slot holds its weight sum, untouched
    assert view.state["score_count"][0, 0].tolist() == [4.0, 3.0, 2.0, 0.0]
    assert view.state["usage"][0, 0].tolist() == [2.0, 0.0, 3.0, 0.0]  # top-2 real slots: 2, 0
    composite = policy.eviction_scores(0, view)[0, 0, :3]
    aas = view.score[0, 0, :3]
    torch.testing.assert_close(composite, view.state["usage"][0, 0, :3] * aas.max() + aas)
    rows = policy.before_eviction(0, view, torch.tensor([[[1]]]))  # slot 1 is the victim
    assert view.state["usage"][0, 0].tolist() == [2.0, 0.0, 3.0, 0.0]  # not written yet
    EvictionStage(policy, Budget(1.0), 1).write_rows(arena, 0, rows)
    assert view.state["usage"][0, 0, :3].tolist() == [0.0, 0.0, 0.5]  # (u - min(u)) * alpha


def test_fold_victims_is_the_weighted_running_mean():
    arena = KVArena(1, 1, 1, 4, 2, dtype=torch.float32)
    arena.k[0, 0, 0] = torch.tensor([[1.0, 0], [0, 1.0], [2.0, 2.0], [4.0, 4.0]])
    arena.v[0, 0, 0] = -arena.k[0, 0, 0]
    arena.pos[0, 0, 0] = torch.tensor([RECONSTRUCTED_POS, 3, 4, 5], dtype=torch.int32)
    arena.score[0, 0, 0] = torch.tensor([2.0, 1.0, 3.0, 0.5])  # SES = 2 for the slot
    k_before = arena.k.clone()
    folded = fold_victims(arena.layer(0), torch.tensor([[[1, 2]]]), torch.tensor([True]))
    assert torch.equal(arena.k, k_before)  # computed and returned, not written
    want = (
        torch.tensor([1.0, 0]) * 2 + torch.tensor([0, 1.0]) * 1 + torch.tensor([2.0, 2]) * 3
    ) / 6
    assert folded.slot.tolist() == [[0]]
    torch.testing.assert_close(folded.k[0, 0], want)
    torch.testing.assert_close(folded.v[0, 0], -want)
    assert float(folded.weight[0, 0]) == 6.0  # SES' = SES + sum AES (eq. 8)
    assert fold_victims(arena.layer(0), torch.tensor([[[1, 2]]]), torch.tensor([False])) is None


def test_eviction_stage_writes_the_folded_slot_and_the_usage_decay():
    """EvictionStage.evict writes what fold_victims and before_eviction returned: every
    component of the reconstructed K/V, its weight sum, and the decayed usage counts."""
    policy = make_policy("auv", sinks=0, usage_decay=0.5)
    arena = KVArena(1, 1, 1, 6, 3, dtype=torch.float32, slot_state=("usage", "score_count"))
    keys = torch.arange(18.0).view(6, 3)
    arena.k[0, 0, 0], arena.v[0, 0, 0] = keys, -keys
    arena.pos[0, 0, 0] = torch.tensor([RECONSTRUCTED_POS, 1, 2, 3, 4, 5], dtype=torch.int32)
    arena.score[0, 0, 0] = torch.tensor([2.0, 5.0, 1.0, 3.0, 0.0, 0.0])  # slot 0: SES = 2
    arena.slot_state["usage"][0, 0, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    arena.lengths[0, 0, 0] = 6
    stage = EvictionStage(policy, Budget(4.0), 1)
    stage.evict(arena, 0, torch.tensor([[4]]), 2, torch.tensor([True]))
    # Composite (eq. 5): usage * max(AAS) + AAS = [5 + 5, 1, 3] over slots 1..3 (slot 0 is the
    # reconstructed one, never a victim): victims 2 and 3, then the window 4, 5 moves in.
    assert arena.pos[0, 0, 0, :4].tolist() == [RECONSTRUCTED_POS, 1, 4, 5]
    assert int(arena.lengths[0, 0, 0]) == 4
    want = (keys[0] * 2 + keys[2] * 1 + keys[3] * 3) / 6
    torch.testing.assert_close(arena.k[0, 0, 0, 0], want)
    torch.testing.assert_close(arena.v[0, 0, 0, 0], -want)
    assert float(arena.score[0, 0, 0, 0]) == 6.0
    assert arena.slot_state["usage"][0, 0, 0, 1] == 0.5  # (1 - min of the staying slots) * alpha


def test_engine_keeps_one_reconstructed_slot_inside_the_budget(tiny_llama_dir):
    cfg = load_config(tiny_llama_dir)
    model = load_model(tiny_llama_dir, cfg, torch.float32, torch.device("cpu"))
    policy = make_policy("auv", decode_window=3, observation_window=4)
    engine = Engine(model, cfg, policy, budget=Budget(10.0), prefill_chunk=16)
    prompt = [(5 * i + 1) % 300 + 3 for i in range(50)]
    state, logits = engine.start([prompt], 12)
    for step in range(12):
        pos, lengths = state.arena.pos[:, 0], state.arena.lengths[:, 0]
        for layer in range(cfg.num_layers):
            for head in range(cfg.num_kv_heads):
                held = pos[layer, head, : int(lengths[layer, head])].tolist()
                assert held.count(RECONSTRUCTED_POS) == 1
                real = [p for p in held if p >= 0]
                assert len(set(real)) == len(real) and len(held) <= 10 + 3
                assert set(range(4)) <= set(real)  # sinks
        if step < 11:
            logits = engine.step(state, logits.argmax(-1))
    assert torch.isfinite(logits).all()
