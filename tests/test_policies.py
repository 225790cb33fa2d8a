"""Eviction policies: kept sets against brute force from each paper's formula, the decode loop
against a masked dense reference, and budget 1.0 against the full cache."""

from __future__ import annotations

import pytest
import torch

from nanokv.budget import Budget
from nanokv.engine import Engine
from nanokv.loader import load_config, load_model
from nanokv.policies import POLICIES, PromptLayer, make_policy

EVICTING = [name for name in POLICIES if name != "full"]


def _engine(path, policy: str, budget: float, **options) -> Engine:
    cfg = load_config(path)
    model = load_model(path, cfg, torch.float32, torch.device("cpu"))
    return Engine(
        model, cfg, make_policy(policy, **options), budget=Budget(budget),
        prefill_chunk=7,
    )  # fmt: skip


def _greedy_logits(engine: Engine, prompts, steps: int) -> list[torch.Tensor]:
    state, logits = engine.start(prompts, steps)
    out = [logits]
    for _ in range(steps - 1):
        logits = engine.step(state, logits.argmax(-1))
        out.append(logits)
    return out


PROMPTS = [[(7 * i + 3) % 300 + 3 for i in range(40)], [(11 * i + 5) % 300 + 3 for i in range(23)]]


@pytest.mark.parametrize("policy", EVICTING)
def test_budget_one_is_the_full_cache(tiny_llama_dir, policy):
    full = _greedy_logits(_engine(tiny_llama_dir, "full", 1.0), PROMPTS, 8)
    ours = _greedy_logits(_engine(tiny_llama_dir, policy, 1.0), PROMPTS, 8)
    for a, b in zip(full, ours, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("policy", EVICTING)
def test_a_count_budget_above_prompt_plus_new_tokens_is_the_full_cache(tiny_llama_dir, policy):
    full = _greedy_logits(_engine(tiny_llama_dir, "full", 1.0), PROMPTS, 6)
    ours = _greedy_logits(_engine(tiny_llama_dir, policy, 46.0), PROMPTS, 6)
    for a, b in zip(full, ours, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ----------------------------------------------------------------- brute-force kept sets


HIDDEN = 20


def _random_prompt(n=40, q_heads=6, kv_heads=2, dim=8, window=6, seed=0) -> PromptLayer:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(q_heads, n, dim, generator=g)
    k = torch.randn(kv_heads, n, dim, generator=g)
    v = torch.randn(kv_heads, n, dim, generator=g)
    o_proj = torch.randn(HIDDEN, q_heads * dim, generator=g)
    return PromptLayer(
        layer=0, seq=0, k=k, v=v, positions=torch.arange(n), window_queries=q[:, n - window :],
        scale=dim**-0.5, queries=q, value_norms=_explicit_value_norms(v, o_proj, q_heads),
        o_proj_weight=o_proj,
    )  # fmt: skip


def _explicit_value_norms(v, o_proj, q_heads):
    """||v_j W_O^h|| by explicit products: (H_q, n)."""
    kv_heads, n, dim = v.shape
    norms = torch.zeros(q_heads, n)
    for h in range(q_heads):
        w_o = o_proj[:, h * dim : (h + 1) * dim].T  # (D, hidden)
        norms[h] = (v[h // (q_heads // kv_heads)] @ w_o).norm(dim=-1)
    return norms


def _dense_attention(q, k, scale):
    """(H_q, t, n) causal softmax for queries at the last t positions, by explicit logits."""
    q_heads, t, _ = q.shape
    n, group = k.shape[1], q_heads // k.shape[0]
    probs = torch.zeros(q_heads, t, n)
    for h in range(q_heads):
        for row in range(t):
            query_pos = n - t + row
            logits = torch.tensor(
                [float(q[h, row] @ k[h // group, j]) * scale for j in range(query_pos + 1)]
            )
            probs[h, row, : query_pos + 1] = torch.softmax(logits, dim=0)
    return probs


def _brute_keep(scores: torch.Tensor, count: int, sinks: int, window: int) -> list[list[int]]:
    n = scores.shape[1]
    kept = []
    for head in scores:
        chosen = list(range(min(sinks, count)))
        for j in range(n - 1, n - 1 - window, -1):
            if len(chosen) < count and j not in chosen:
                chosen.append(j)
        rest = sorted((j for j in range(n) if j not in chosen), key=lambda j: (-float(head[j]), j))
        chosen += rest[: count - len(chosen)]
        kept.append(sorted(chosen))
    return kept


def _max_pool(row: torch.Tensor, kernel: int) -> torch.Tensor:
    half = kernel // 2
    return torch.stack([row[max(0, j - half) : j + half + 1].max() for j in range(len(row))])


def _policy_keep(name: str, prompt: PromptLayer, count: int, **options) -> list[list[int]]:
    from nanokv.policies.selection import select_prompt_tokens

    policy = make_policy(name, **options)
    scores = policy.prefill_scores(prompt)
    kept = select_prompt_tokens(
        scores, count, sinks=policy.options.sinks, window=prompt.window_queries.shape[1]
    )
    return kept.tolist()


@pytest.mark.parametrize("pool", [1, 7])
def test_snapkv_keeps_the_brute_force_set(pool):
    prompt = _random_prompt(window=6)
    attn = _dense_attention(prompt.window_queries, prompt.k, prompt.scale)  # (H_q, w, n)
    per_head = attn.mean(dim=1).view(2, 3, -1).mean(dim=1)  # window mean, then group mean
    scores = torch.stack([_max_pool(row, pool) for row in per_head])
    want = _brute_keep(scores, 15, sinks=4, window=6)
    assert _policy_keep("snapkv", prompt, 15, pool=pool, observation_window=6) == want


def test_h2o_keeps_the_brute_force_set():
    prompt = _random_prompt()
    attn = _dense_attention(prompt.queries, prompt.k, prompt.scale)  # every query
    scores = attn.sum(dim=1).view(2, 3, -1).sum(dim=1)
    want = _brute_keep(scores, 12, sinks=4, window=6)
    assert _policy_keep("h2o", prompt, 12, pool=1, observation_window=6) == want


def test_tova_keeps_the_brute_force_set():
    prompt = _random_prompt()
    attn = _dense_attention(prompt.window_queries[:, -1:], prompt.k, prompt.scale)[:, 0]
    scores = attn.view(2, 3, -1).mean(dim=1)
    want = _brute_keep(scores, 10, sinks=4, window=6)
    assert _policy_keep("tova", prompt, 10, pool=1, observation_window=6) == want


@pytest.mark.parametrize("normalise", ["fro", "sum", "none"])
def test_laprox_scores_are_the_column_row_bound(normalise):
    """score[g, j] = sum_{h in g} ||a[h, :, j]|| * ||v_j W_O^h|| / normaliser, pooled."""
    prompt = _random_prompt(window=6)
    attn = _dense_attention(prompt.window_queries, prompt.k, prompt.scale)  # (H_q, w, n)
    bound = attn.norm(dim=1) * prompt.value_norms  # (H_q, n)
    raw = bound.view(2, 3, -1).sum(dim=1)
    output = torch.zeros(6, HIDDEN)  # O = sum_{h, j} a[h, :, j] (v_j W_O^h), term by term
    for h in range(6):
        w_o = prompt.o_proj_weight[:, h * 8 : (h + 1) * 8].T
        for j in range(prompt.k.shape[1]):
            output += attn[h, :, j : j + 1] * (prompt.v[h // 3, j] @ w_o)
    divisor = {"fro": output.norm(), "sum": raw.sum(), "none": torch.tensor(1.0)}[normalise]
    policy = make_policy("laprox", pool=5, normalise=normalise, observation_window=6)
    got = policy.prefill_scores(prompt)
    want = torch.stack([_max_pool(row, 5) for row in raw / divisor])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    kept = _policy_keep("laprox", prompt, 12, pool=5, normalise=normalise, observation_window=6)
    assert kept == _brute_keep(want, 12, sinks=4, window=6)


def test_streaming_keeps_sinks_and_recent():
    prompt = _random_prompt(n=30)
    kept = _policy_keep("streaming", prompt, 10, observation_window=6)
    assert kept == [[0, 1, 2, 3, *range(24, 30)]] * 2


def test_chunks_keep_whole_chunks():
    from nanokv.policies.selection import chunk_scores

    scores = torch.tensor([[0.0, 9.0, 0.0, 0.0, 1.0, 1.0, 5.0]])
    torch.testing.assert_close(chunk_scores(scores, 2), torch.tensor([[4.5, 4.5, 0, 0, 1, 1, 5]]))
    kept = _brute_keep(chunk_scores(scores, 2), 4, sinks=0, window=0)
    assert kept == [[0, 1, 4, 6]] or kept == [[0, 1, 6, 4]]


# ----------------------------------------------------------------- decode loop vs dense reference


def _masked_dense_logits(engine: Engine, tokens: list[int], allowed: torch.Tensor) -> torch.Tensor:
    """The model over `tokens` with attention restricted to allowed (T, T) (no arena, no kernel)."""
    model, cfg = engine.model, engine.cfg
    positions = torch.arange(len(tokens))
    h = model.embed(torch.tensor(tokens), positions)
    group = cfg.num_heads // cfg.num_kv_heads
    for block in model.blocks:
        q, k, v = block.qkv(h, positions)
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        logits = torch.einsum("thd,shd->hts", q, k) * engine.scale
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        h = block.finish(h, torch.einsum("hts,shd->thd", probs, v).reshape(len(tokens), -1))
    return model.logits(h)


def test_streaming_decode_equals_masked_dense_attention(tiny_llama_dir):
    """Sinks + a recent window with multi-step eviction: every decode step attends to exactly the
    first 4 tokens and the most recent ones, as a dense attention with that mask does."""
    sinks, cache, window, steps = 4, 12, 3, 14
    engine = _engine(tiny_llama_dir, "streaming", float(cache), sinks=sinks, decode_window=window)
    prompt = PROMPTS[0][:20]
    state, logits = engine.start([prompt], steps)
    tokens, ours, lengths = list(prompt), [logits[0]], []
    for _ in range(steps - 1):
        token = int(logits[0].argmax())
        tokens.append(token)
        logits = engine.step(state, torch.tensor([token]))
        ours.append(logits[0])
        lengths.append(int(state.arena.lengths[0, 0, 0]))
    n, total = len(prompt), len(tokens)
    allowed = torch.ones(total, total).tril().bool()
    for step, length in enumerate(lengths):
        row = n + step
        allowed[row] = False
        allowed[row, :sinks] = True
        allowed[row, row - (length - sinks) + 1 : row + 1] = True
    assert max(lengths) == cache + window and min(lengths) == cache + 1
    reference = _masked_dense_logits(engine, tokens, allowed)
    torch.testing.assert_close(torch.stack(ours), reference[n - 1 :], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mistral", "opt-post-ln"])
@pytest.mark.parametrize("policy", [*EVICTING, "quest", "laprox+quest"])
def test_every_policy_runs_on_mistral_and_opt(tmp_path_factory, kind, policy):
    """Sliding-window Mistral (GQA 4:1) and post-LayerNorm OPT (MHA) under every policy."""
    from tiny_models import make_hf_model, save_checkpoint

    import nanokv

    path = save_checkpoint(make_hf_model(kind), tmp_path_factory.mktemp(kind))
    llm = nanokv.LLM(
        path, policy=policy, budget=12.0, quest_dense_layers=1, decode_window=3, min_cache=0
    )
    state, logits = llm.engine.start(PROMPTS, 8)
    for _ in range(7):
        logits = llm.engine.step(state, logits.argmax(-1))
    assert torch.isfinite(logits).all()
    if policy != "quest":
        assert int(state.kept_after_prefill.float().mean()) == 12
