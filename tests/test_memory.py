"""The memory promise: the arena holds what the budget, the decode window and the allocation
rule say, never more, and `--verbose` reports the bytes the arena really allocated.

Bounds per (layer, kv head), W the configured decode window (DESIGN.md, "The arena"):

- uniform: the budget's tokens + W;
- pyramid: the first layer's count (the largest of the schedule) + W, in every layer;
- layer / global: the arena is rectangular, so every head pays for the largest one: head_cap + W,
  head_cap = ceil(max_head_share x budget) (at most the prompt).

Each slot also carries metadata (position, the policy's score and extra slot state, value-output
norms for output-aware policies); the full-cache reference counts the same metadata per slot, and
K/V alone are compared with the report's full-cache K/V bytes.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from nanokv.arena import KVArena, LayerStack
from nanokv.budget import Budget
from nanokv.cli import main
from nanokv.engine import DecodeState, Engine
from nanokv.head_pages import HeadPages, PackedBuffer
from nanokv.loader import load_config, load_model
from nanokv.policies import POLICIES, make_policy, parse_policy
from nanokv.policies.allocation import ALLOCATIONS, MODEL_WIDE, pyramid_budgets
from nanokv.sparsity import QuestOptions

SPECS = [*(name for name in POLICIES if name != "full"), "laprox+quest"]
PROMPT = [(13 * i + 7) % 300 + 3 for i in range(220)]
NEW = 8
INT32 = FLOAT32 = 4  # bytes of the arena's int32 positions / lengths and float32 slot statistics


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    cfg = load_config(tiny_llama_dir)
    return cfg, load_model(tiny_llama_dir, cfg, torch.float32, torch.device("cpu"))


def real_bytes(tensors: list[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors`: what is really allocated (a tensor
    aliased twice, such as the arena's `score`, counts once)."""
    storages = {}
    for tensor in tensors:
        if tensor is not None:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def arena_tensors(arena: KVArena) -> list[torch.Tensor]:
    """Every tensor the arena object holds, directly or in a dict (so a new buffer counts too)."""
    found = []
    for value in vars(arena).values():
        values = value.values() if isinstance(value, dict) else [value]
        if isinstance(value, list):  # the packed layers' layouts (KVArena.pack_heads)
            values = [t for pages in value if isinstance(pages, HeadPages) for t in pages_of(pages)]
        for item in values:  # a per-layer buffer is a tuple of tensors (KVArena.shrink_layers)
            for part in item.parts() if isinstance(item, LayerStack) else [item]:
                if isinstance(part, PackedBuffer):  # a packed layer's buffer
                    part = part.flat
                if torch.is_tensor(part):
                    found.append(part)
    return found


def pages_of(pages: HeadPages) -> list[torch.Tensor]:
    return [pages.starts, pages.caps, pages.row_of_slot]


def arena_layers(buffer) -> list[torch.Tensor]:
    """A buffer's tensors: the stacked one, or one a layer (a packed layer's flat one)."""
    parts = list(buffer.parts()) if isinstance(buffer, LayerStack) else [buffer]
    return [part.flat if isinstance(part, PackedBuffer) else part for part in parts]


def quest_tensors(state: DecodeState) -> list[torch.Tensor]:
    """Quest's page bounds: memory held next to the arena (2 keys per page of 16 slots)."""
    if state.quest is None:
        return []
    return [t for bounds in state.quest.bounds if bounds is not None for t in bounds]


def _engine(tiny, spec: str, allocation: str, budget: float, **options) -> Engine:
    cfg, model = tiny
    name, uses_quest = parse_policy(spec)
    policy = make_policy(name, allocation=allocation, **options)
    quest = QuestOptions(budget=Budget(budget / 2), dense_layers=1) if uses_quest else None
    return Engine(model, cfg, policy, budget=Budget(budget), quest=quest, prefill_chunk=64)


def _head_slots(engine: Engine, allocation: str, kept: int, n: int) -> int:
    """The most slots the allocation lets one (layer, kv head) hold, decode window included."""
    options, layers = engine.policy.options, engine.cfg.num_layers
    if allocation == "uniform":
        most = kept
    elif allocation == "pyramid":
        protected = min(options.sinks + options.observation_window, kept)
        most = pyramid_budgets(kept, layers, protected)[0]  # the first layer keeps the most
    else:
        most = min(math.ceil(options.max_head_share * kept), n)  # head_cap
    return min(most + options.decode_window, n + NEW)


# (budget, max_head_share): head_cap = share x budget stays under the prompt (88 and 110 of 220
# tokens), so the layer / global bound is not the full cache.
BUDGETS = [(0.1, 4.0), (0.25, 2.0)]


@pytest.mark.parametrize(("budget", "share"), BUDGETS, ids=["b0.1", "b0.25"])
@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("spec", SPECS)
def test_the_arena_holds_at_most_the_budget_plus_the_window(tiny, spec, allocation, budget, share):
    # A short observation window, so that the protected tokens do not fill a 10% budget and the
    # layer / global selections really give heads different counts.
    options = dict(observation_window=8, max_head_share=share)
    if spec == "auv" and allocation in MODEL_WIDE:
        with pytest.raises(ValueError, match="reconstructed slot needs a per-layer allocation"):
            _engine(tiny, spec, allocation, budget, **options)
        options["reconstruct"] = False
    engine = _engine(tiny, spec, allocation, budget, **options)
    cfg, policy = engine.cfg, engine.policy
    layers, heads, head_dim = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    n, group = len(PROMPT), cfg.num_heads // cfg.num_kv_heads
    state, logits = engine.start([PROMPT], NEW)
    arena = state.arena
    held = real_bytes(arena_tensors(arena))
    assert held == arena.nbytes  # `nbytes` (what the report shows) is what is allocated

    kept = Budget(budget).tokens(n)
    assert state.kept_after_prefill.float().mean() <= kept  # the budget is a mean per head
    slots = _head_slots(engine, allocation, kept, n)
    assert slots < n + NEW  # the bound is not the full cache
    assert arena.capacity <= slots
    # Shrunk after prefill to the largest head's kept tokens plus the window, whatever the rule.
    window = policy.options.decode_window
    assert state.window <= window
    assert arena.capacity <= int(state.kept_after_prefill.max()) + window
    for layer in range(layers):  # and each layer to its own largest head plus the window
        largest = int(state.kept_after_prefill[layer].max())
        assert largest <= arena.layer_capacity(layer) <= largest + window
    element = arena.element_size
    metadata = INT32 + FLOAT32 * (1 + len(policy.slot_state))  # pos, score, extra slot state
    metadata += FLOAT32 * group if policy.needs_value_norms else 0  # per query head
    per_slot = 2 * head_dim * element + metadata
    lengths = layers * heads * INT32  # one length per (layer, seq, kv head)
    assert held <= layers * heads * slots * per_slot + lengths
    full = layers * heads * (n + NEW) * per_slot + lengths  # a full cache, same metadata
    assert held - lengths <= (full - lengths) * slots / (n + NEW)
    full_kv = 2 * layers * heads * (n + NEW) * head_dim * element  # the report's full cache
    assert real_bytes([*arena_layers(arena.k), *arena_layers(arena.v)]) <= full_kv * slots / (
        n + NEW
    )
    if state.quest is not None:  # Quest's page bounds sit next to the arena: 2 keys a page
        sparse = layers - state.quest.options.dense_layers
        pages = math.ceil(slots / state.quest.options.page_size)
        assert real_bytes(quest_tensors(state)) <= sparse * heads * pages * 2 * head_dim * element

    pointers = [t.data_ptr() for t in arena_tensors(arena)]
    for _ in range(NEW - 1):  # decoding (with multi-step evictions) never grows the arena
        logits = engine.step(state, logits.argmax(-1))
    assert [t.data_ptr() for t in arena_tensors(arena)] == pointers
    assert real_bytes(arena_tensors(arena)) == held
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("policy", ["snapkv", "auv", "laprox", "h2o+quest"])
def test_verbose_reports_the_arenas_real_bytes(tiny_llama_dir, monkeypatch, capsys, policy):
    """`nanokv generate --verbose`: the arena figure (MiB and bytes) is what the arena of that
    run really allocated, and the full-cache figure is K and V of prompt + new tokens."""
    states = []
    report = Engine.report

    def recording(self, state, prompts, *args, **kwargs):
        states.append((state, len(prompts[0])))  # the run's state, as it is reported
        return report(self, state, prompts, *args, **kwargs)

    monkeypatch.setattr(Engine, "report", recording)
    argv = [
        "generate", "--model", str(tiny_llama_dir), "--policy", policy, "--budget", "0.1",
        "--min-cache", "0", "--max-new-tokens", str(NEW), "--seed", "0", "--verbose",
        "the quick brown fox jumps over the lazy dog " * 18,
    ]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    ((state, prompt_tokens),) = states
    held = real_bytes(arena_tensors(state.arena))
    line = next(line for line in err.splitlines() if line.startswith("arena "))
    figures = re.findall(r"([\d.]+) MiB \(([\d,]+) bytes of ", line)
    assert len(figures) == 2, line
    (arena_mib, arena_bytes), (full_mib, full_bytes) = figures
    assert int(arena_bytes.replace(",", "")) == held
    assert arena_mib == f"{held / 2**20:.2f}"
    cfg = load_config(tiny_llama_dir)
    tokens = prompt_tokens + NEW  # the prompt and the new tokens the run was sized for
    element = state.arena.k.element_size()  # the run's dtype (auto)
    want_full = 2 * cfg.num_layers * tokens * cfg.num_kv_heads * cfg.head_dim * element
    assert int(full_bytes.replace(",", "")) == want_full
    assert full_mib == f"{want_full / 2**20:.2f}"
    assert f"{held / want_full:.1%}" in line
    assert held < want_full  # 10% of a ~200-token prompt: the arena really is smaller
