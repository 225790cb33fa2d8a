"""KVArena: every sequence's keys and values in one preallocated buffer sized to the budget.

Layout (DESIGN.md, "The arena"): ``k, v: (L, B, H_kv, C, D)``; per slot the original token
position ``pos`` (int32, -1 when empty, -2 for a reconstructed slot) and the policy's per-slot
state (float32): its running ``score`` plus any named extras it asks for (AUV's usage counts); per
query head
and slot the value-output norm ``value_norms`` (float32, only when a policy reads output
contributions); per ``(layer, seq, kv_head)`` a ``length``. The valid slots of a head are always
``0 .. length - 1``: the positioning pointer for the next write is ``length`` itself, eviction
compacts the kept slots to the front, and nothing is ever reallocated.

Keys are stored after RoPE with their original position, so a kept token never needs re-rotation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class ArenaFullError(RuntimeError):
    """A write would exceed the arena's capacity: the policy should have evicted first."""


@dataclass(frozen=True)
class ArenaLayer:
    """Views of one layer of the arena, as the decode kernel reads them."""

    k: torch.Tensor  # (B, H_kv, C, D)
    v: torch.Tensor  # (B, H_kv, C, D)
    pos: torch.Tensor  # (B, H_kv, C) int32
    score: torch.Tensor  # (B, H_kv, C) float32
    lengths: torch.Tensor  # (B, H_kv) int32
    value_norms: torch.Tensor | None  # (B, H_q, C) float32
    state: dict[str, torch.Tensor]  # name -> (B, H_kv, C) float32, policy-owned extras


@functools.lru_cache(maxsize=256)  # one entry per (batch, heads, layer capacity) in use
def _row_starts(batch: int, heads: int, capacity: int, device: torch.device) -> torch.Tensor:
    """(B, heads) int64: where each (sequence, head) row of a (B, heads, capacity) buffer starts
    in its flat view. Made once per shape and device and shared (read only), so that a decode
    step's write is one indexed copy a buffer."""
    return (torch.arange(batch * heads, device=device) * capacity).view(batch, heads)


@dataclass(frozen=True)
class _FlatRows:
    """One layer's buffers as flat rows of slots, so that a decode step's write is one indexed
    copy a buffer with no view made on the way (`KVArena.append`)."""

    k: torch.Tensor  # (B * H_kv * C, D)
    v: torch.Tensor  # (B * H_kv * C, D)
    pos: torch.Tensor  # (B * H_kv * C,) int32
    slot_state: tuple[torch.Tensor, ...]  # every per-slot statistic, score first: (B * H_kv * C,)
    value_norms: torch.Tensor | None  # (B * H_q * C,) float32


class KVArena:
    """Preallocated K/V plus per-slot metadata; allocated once per generate call."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        q_heads: int | None = None,
        slot_state: tuple[str, ...] = (),
    ) -> None:
        """`q_heads` given: also allocate per-query-head value-output norms; `slot_state`: names
        of extra per-slot float32 statistics that move with their token."""
        if capacity <= 0:
            raise ValueError(f"arena capacity must be positive, got {capacity}")
        shape = (num_layers, batch, kv_heads, capacity)
        self.k = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full(shape, -1, dtype=torch.int32, device=device)
        self.slot_state = {
            name: torch.zeros(shape, dtype=torch.float32, device=device)
            for name in ("score", *slot_state)
        }
        self.score = self.slot_state["score"]
        self.lengths = torch.zeros(shape[:3], dtype=torch.int32, device=device)
        self._longest = [0] * num_layers  # per layer, the longest head's length, on the host
        self._views: list[ArenaLayer] | None = None
        self._flat: list[_FlatRows] | None = None
        self.value_norms = None
        if q_heads is not None:
            norms_shape = (num_layers, batch, q_heads, capacity)
            self.value_norms = torch.zeros(norms_shape, dtype=torch.float32, device=device)

    @staticmethod
    def bytes_for(
        num_layers: int,
        batch: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        *,
        element_size: int,
        q_heads: int | None = None,
        slot_state: int = 0,
    ) -> int:
        """What `nbytes` of an arena of this shape is, before allocating it (`slot_state`:
        how many extra per-slot statistics the policy asks for)."""
        slots = num_layers * batch * kv_heads * capacity
        per_slot = 2 * head_dim * element_size + 4 + 4 * (1 + slot_state)  # K, V, pos, score...
        norms = 0 if q_heads is None else num_layers * batch * q_heads * capacity * 4
        return slots * per_slot + norms + num_layers * batch * kv_heads * 4  # + lengths

    @property
    def capacity(self) -> int:
        """The largest layer's slots a (layer, seq, kv head)."""
        return max(self.layer_capacity(layer) for layer in range(len(self.k)))

    def layer_capacity(self, layer: int) -> int:
        return self.k[layer].shape[2]

    @property
    def per_layer(self) -> bool:
        """True once `shrink_layers` gave layers capacities of their own: the buffers are then
        tuples of per-layer tensors, (B, H_kv, C_l, ...) each, indexed `[layer]` as before."""
        return isinstance(self.k, tuple)

    @property
    def element_size(self) -> int:
        return self.k[0].element_size()

    @property
    def nbytes(self) -> int:
        """Bytes held by the arena's tensors (K, V and all slot metadata)."""
        tensors = [self.k, self.v, self.pos, self.lengths, self.value_norms]
        tensors += list(self.slot_state.values())
        flat = [t for item in tensors if item is not None for t in _parts(item)]
        return sum(t.numel() * t.element_size() for t in flat)

    def layer(self, index: int) -> ArenaLayer:
        """Views of one layer. Made once per buffer allocation (a decode step asks for every
        layer's), rebuilt after `shrink` / `grow` and in a copy of the arena."""
        if self._views is None:
            self._views = [self._layer_views(layer) for layer in range(len(self.k))]
        return self._views[index]

    def _flat_rows(self, index: int) -> _FlatRows:
        """Flat views of one layer (see `_FlatRows`), cached like `layer`'s."""
        if self._flat is None:
            self._flat = [self._layer_rows(layer) for layer in range(len(self.k))]
        return self._flat[index]

    def _layer_rows(self, index: int) -> _FlatRows:
        head_dim = self.k[index].shape[-1]
        norms = None if self.value_norms is None else self.value_norms[index].view(-1)
        return _FlatRows(
            self.k[index].view(-1, head_dim),
            self.v[index].view(-1, head_dim),
            self.pos[index].view(-1),
            tuple(buffer[index].view(-1) for buffer in self.slot_state.values()),
            norms,
        )

    def _forget_views(self) -> None:
        """After the buffers were reallocated: views are rebuilt on next use."""
        self._views = None
        self._flat = None

    def __getstate__(self) -> dict:
        # a deep copy rebuilds views of its own buffers
        return {**self.__dict__, "_views": None, "_flat": None}

    def _layer_views(self, index: int) -> ArenaLayer:
        norms = None if self.value_norms is None else self.value_norms[index]
        return ArenaLayer(
            self.k[index],
            self.v[index],
            self.pos[index],
            self.score[index],
            self.lengths[index],
            norms,
            {name: buffer[index] for name, buffer in self.slot_state.items() if name != "score"},
        )

    def fill(
        self,
        layer: int,
        seq: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        kept: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        value_norms: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Writes one sequence's prompt K/V of one layer into slots 0.. of each kv head.

        k, v: (H_kv, n, D); positions: (n,); kept: (H_kv, m) indices into the n prompt tokens
        (None keeps all n, in order), of which the first counts[g] are valid for head g (None:
        all m); value_norms: (H_q, n); scores: (H_kv, n) the policy's prompt scores, kept as the
        slots' running statistic; state: name -> (H_kv, n) initial extra statistics.
        """
        kv_heads, n, head_dim = k.shape
        if kept is None:
            kept = torch.arange(n, device=k.device).expand(kv_heads, n)
        width, capacity = kept.shape[1], self.layer_capacity(layer)
        if width > capacity:
            raise ArenaFullError(f"{width} prompt tokens do not fit {capacity} slots")
        gather = kept.unsqueeze(-1).expand(-1, -1, head_dim)
        self.k[layer][seq, :, :width] = k.gather(1, gather)
        self.v[layer][seq, :, :width] = v.gather(1, gather)
        self.pos[layer][seq, :, :width] = positions[kept].to(torch.int32)
        for buffer in self.slot_state.values():
            buffer[layer][seq] = 0
        initial = dict(state or {})
        if scores is not None:
            initial["score"] = scores
        for name, values in initial.items():
            self.slot_state[name][layer][seq, :, :width] = values.float().gather(1, kept)
        if value_norms is not None and self.value_norms is not None:
            group = value_norms.shape[0] // kv_heads
            kept_q = kept.repeat_interleave(group, dim=0)  # (H_q, m)
            self.value_norms[layer][seq, :, :width] = value_norms.float().gather(1, kept_q)
        counts = torch.full((kv_heads,), width) if counts is None else counts
        self.set_lengths(layer, counts.view(1, -1).to(self.lengths.device), seq=seq)

    def append(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        value_norms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Writes one new token per sequence at each head's positioning pointer.

        k, v: (B, H_kv, D); positions: (B,); value_norms: (B, H_q). Returns the slots written,
        (B, H_kv).
        """
        view, rows = self.layer(layer), self._flat_rows(layer)
        capacity = view.k.shape[2]
        if self._longest[layer] >= capacity:  # a flat index past a row would write the next
            raise ArenaFullError(f"layer {layer} is full ({capacity} slots): evict first")
        slots = view.lengths.long()  # (B, H_kv)
        batch, kv_heads = slots.shape
        flat = (_row_starts(batch, kv_heads, capacity, slots.device) + slots).view(-1)  # (B H_kv,)
        head_dim = k.shape[-1]
        rows.k.index_copy_(0, flat, k.reshape(-1, head_dim))
        rows.v.index_copy_(0, flat, v.reshape(-1, head_dim))
        rows.pos.index_copy_(0, flat, positions.to(torch.int32).repeat_interleave(kv_heads))
        for buffer in rows.slot_state:
            buffer.index_fill_(0, flat, 0)
        if value_norms is not None and rows.value_norms is not None:
            q_heads = value_norms.shape[1]
            q_slots = slots.repeat_interleave(q_heads // kv_heads, dim=1)  # (B, H_q)
            q_flat = (_row_starts(batch, q_heads, capacity, slots.device) + q_slots).view(-1)
            rows.value_norms.index_copy_(0, q_flat, value_norms.reshape(-1).float())
        view.lengths.add_(1)
        self._longest[layer] += 1
        return slots

    def compact(self, layer: int, kept_slots: torch.Tensor, kept_counts: torch.Tensor) -> None:
        """Moves each head's kept slots to the front and sets its length; frees the rest.

        kept_slots: (B, H_kv, m) slot indices, the first kept_counts[b, g] of each row valid and
        distinct (padding entries are ignored); kept_counts: (B, H_kv).
        """
        for seq in range(kept_slots.shape[0]):
            self.compact_sequence(layer, seq, kept_slots[seq], kept_counts[seq])

    def compact_sequence(
        self, layer: int, seq: int, kept_slots: torch.Tensor, kept_counts: torch.Tensor
    ) -> None:
        """`compact` for one sequence: kept_slots (H_kv, m), kept_counts (H_kv,)."""
        m = kept_slots.shape[-1]
        valid = torch.arange(m, device=kept_slots.device) < kept_counts.unsqueeze(-1)
        source = torch.where(valid, kept_slots, kept_slots[..., :1]).long()  # (H_kv, m)
        head_dim = self.k[0].shape[-1]
        vector_index = source.unsqueeze(-1).expand(-1, -1, head_dim)
        for buffer in (self.k, self.v):
            buffer[layer][seq, :, :m] = buffer[layer][seq].gather(1, vector_index)
        for buffer in (self.pos, *self.slot_state.values()):
            buffer[layer][seq, :, :m] = buffer[layer][seq].gather(1, source)
        if self.value_norms is not None:
            norms = self.value_norms[layer][seq]  # (H_q, C)
            norm_index = source.repeat_interleave(norms.shape[0] // source.shape[0], dim=0)
            norms[:, :m] = norms.gather(1, norm_index)
        self.set_lengths(layer, kept_counts.view(1, -1), seq=seq)

    def scatter(self, layer: int, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Moves slot contents src -> dst per (seq, kv head) without changing lengths.

        src_slots, dst_slots: (B, H_kv, w). Used by multi-step eviction: the decode window's
        tokens are scattered into the slots freed by the victims, then `set_lengths` drops the
        window area. A source equal to its destination is a no-op; otherwise they must not
        overlap.
        """
        head_dim = self.k[0].shape[-1]
        src_vec = src_slots.long().unsqueeze(-1).expand(-1, -1, -1, head_dim)
        dst_vec = dst_slots.long().unsqueeze(-1).expand(-1, -1, -1, head_dim)
        for buffer in (self.k, self.v):
            buffer[layer].scatter_(2, dst_vec, buffer[layer].gather(2, src_vec))
        for buffer in (self.pos, *self.slot_state.values()):
            buffer[layer].scatter_(2, dst_slots.long(), buffer[layer].gather(2, src_slots.long()))
        if self.value_norms is not None:
            group = self.value_norms[layer].shape[1] // src_slots.shape[1]
            src_q = src_slots.long().repeat_interleave(group, dim=1)
            dst_q = dst_slots.long().repeat_interleave(group, dim=1)
            norms = self.value_norms[layer]
            norms.scatter_(2, dst_q, norms.gather(2, src_q))

    def set_lengths(self, layer: int, lengths: torch.Tensor, seq: int | None = None) -> None:
        """Sets each head's length, (B, H_kv) (or (1, H_kv) for one `seq`), marking the slots
        past it empty."""
        rows = slice(None) if seq is None else slice(seq, seq + 1)
        slots = torch.arange(self.layer_capacity(layer), device=lengths.device)
        beyond = slots.view(1, 1, -1) >= lengths.unsqueeze(-1)
        self.pos[layer][rows].masked_fill_(beyond, -1)
        self.lengths[layer, rows] = lengths.to(torch.int32)
        self._longest[layer] = int(self.lengths[layer].max())

    def write_slot(
        self,
        layer: int,
        seq: int,
        slot: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos: int,
        score: torch.Tensor | None = None,
    ) -> None:
        """Writes one vector per kv head at `slot` (H_kv,) without changing lengths (AUV's
        reconstructed K/V). k, v: (H_kv, D); score: (H_kv,) or None."""
        heads = torch.arange(k.shape[0], device=k.device)
        self.k[layer][seq, heads, slot] = k.to(self.k[layer].dtype)
        self.v[layer][seq, heads, slot] = v.to(self.v[layer].dtype)
        self.pos[layer][seq, heads, slot] = pos
        if score is not None:
            self.score[layer][seq, heads, slot] = score

    def overwrite_slots(
        self,
        layer: int,
        slot: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        score: torch.Tensor,
    ) -> None:
        """Overwrites one slot (B, H_kv) per head of every sequence in place, keeping its
        position: k, v (B, H_kv, D), score (B, H_kv) (AUV folding victims into its slot)."""
        index = slot.view(*slot.shape, 1, 1).expand(*slot.shape, 1, k.shape[-1])
        self.k[layer].scatter_(2, index, k.unsqueeze(2).to(self.k[layer].dtype))  # (B, H_kv, 1, D)
        self.v[layer].scatter_(2, index, v.unsqueeze(2).to(self.v[layer].dtype))
        self.score[layer].scatter_(-1, slot.unsqueeze(-1), score.unsqueeze(-1))

    def set_slot_state(self, layer: int, rows: dict[str, torch.Tensor]) -> None:
        """Replaces per-slot statistics of `layer`: name -> (B, H_kv, C) values (what a policy
        returned from a decode step)."""
        for name, values in rows.items():
            self.slot_state[name][layer].copy_(values)

    def shrink(self, capacity: int) -> None:
        """Reallocates every buffer with `capacity` slots, keeping slots 0 .. capacity - 1.

        Used once, between prefill and decode, when a layer- or model-wide selection kept fewer
        tokens per head than the arena was sized for: the decode loop then holds only what was
        kept (plus the window)."""
        if capacity < int(self.lengths.max()) or capacity >= self.capacity:
            return
        self.shrink_layers([capacity] * len(self.k))

    def shrink_layers(self, capacities: list[int]) -> None:
        """`shrink` with a capacity per layer: a `global` selection keeps very different counts
        in different layers, and a rectangle sized to the largest would hold every layer at its
        size. Layers of different sizes turn the buffers into tuples of per-layer tensors."""
        held = self.lengths.amax(dim=(1, 2)).tolist()
        wanted = [
            min(max(c, h), self.layer_capacity(layer))
            for layer, (c, h) in enumerate(zip(capacities, held, strict=True))
        ]
        if all(c == self.layer_capacity(layer) for layer, c in enumerate(wanted)):
            return
        cut = _stacked if len(set(wanted)) == 1 and not self.per_layer else _layered
        self.k, self.v = cut(self.k, wanted, vector=True), cut(self.v, wanted, vector=True)
        self.pos = cut(self.pos, wanted)
        self.slot_state = {name: cut(t, wanted) for name, t in self.slot_state.items()}
        self.score = self.slot_state["score"]
        if self.value_norms is not None:
            self.value_norms = cut(self.value_norms, wanted)
        self._forget_views()

    def grow(self, capacity: int) -> None:
        """Reallocates every buffer with `capacity` slots, keeping every slot and marking the new
        ones empty: `shrink`'s counterpart, for an arena that must take more tokens than it was
        sized for (a conversation grows it at most once a turn, before the turn is written).
        Per-layer buffers become stacked again."""
        if capacity <= self.capacity and not self.per_layer:
            return
        capacity = max(capacity, self.capacity)
        self.k, self.v = (
            _padded(self.k, capacity, vector=True),
            _padded(self.v, capacity, vector=True),
        )
        self.pos = _padded(self.pos, capacity, value=-1)
        self.slot_state = {name: _padded(t, capacity) for name, t in self.slot_state.items()}
        self.score = self.slot_state["score"]
        if self.value_norms is not None:
            self.value_norms = _padded(self.value_norms, capacity)
        self._forget_views()


class LayerStack(tuple):
    """One tensor a layer, (B, H_kv, C_l, ...) each: an arena buffer after `shrink_layers`.
    Indexed like the stacked buffer it replaces when the first index is a layer:
    `stack[layer]` is that layer's tensor and `stack[layer, seq, head, :n]` indexes into it."""

    def __getitem__(self, key):
        if isinstance(key, tuple) and key and isinstance(key[0], int):
            return tuple.__getitem__(self, key[0])[key[1:]]
        return tuple.__getitem__(self, key)

    def clone(self) -> LayerStack:
        return LayerStack(t.clone() for t in self)

    def element_size(self) -> int:
        return self[0].element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self[0].dtype

    def equal(self, other: LayerStack) -> bool:
        """Same layers, shapes and values (what `torch.equal` says of stacked buffers)."""
        return len(self) == len(other) and all(
            torch.equal(a, b) for a, b in zip(self, other, strict=True)
        )


Buffer = torch.Tensor | LayerStack  # stacked (L, ...) or one tensor a layer


def same_buffer(a: Buffer, b: Buffer) -> bool:
    """`torch.equal` for arena buffers, stacked or one tensor a layer."""
    if isinstance(a, LayerStack) or isinstance(b, LayerStack):
        return isinstance(a, LayerStack) and isinstance(b, LayerStack) and a.equal(b)
    return torch.equal(a, b)


def _parts(buffer: Buffer) -> tuple[torch.Tensor, ...]:
    return buffer if isinstance(buffer, tuple) else (buffer,)


def _stacked(buffer: torch.Tensor, capacities: list[int], vector: bool = False) -> torch.Tensor:
    """The stacked buffer cut to one capacity for every layer (a copy)."""
    slots = slice(0, capacities[0])
    return (buffer[..., slots, :] if vector else buffer[..., slots]).clone()


def _layered(buffer: Buffer, capacities: list[int], vector: bool = False) -> LayerStack:
    """One tensor a layer, each cut to its layer's capacity (copies)."""
    return LayerStack(
        (buffer[layer][..., :c, :] if vector else buffer[layer][..., :c]).clone()
        for layer, c in enumerate(capacities)
    )


def _padded(buffer: Buffer, capacity: int, vector: bool = False, value: float = 0) -> torch.Tensor:
    """The buffer, stacked, with every layer padded to `capacity` slots of `value`."""
    layers = [buffer] if not isinstance(buffer, tuple) else [t.unsqueeze(0) for t in buffer]
    pad = [
        (0, 0, 0, capacity - t.shape[-2]) if vector else (0, capacity - t.shape[-1]) for t in layers
    ]
    return torch.cat([F.pad(t, p, value=value) for t, p in zip(layers, pad, strict=True)])
