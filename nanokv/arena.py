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

After prefill the arena is cut to what decoding needs: one rectangle a layer as wide as its
largest head (`shrink_layers`), or, where the heads of a layer kept different counts (`layer` and
`global` selections), a packed layer in which each head holds only its own slots (`pack_heads`,
head_pages.py). A packed layer's views are rectangles gathered on demand; its edits go through
such a rectangle and are written back; the decode step writes and attends to it in place.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanokv.head_pages import HeadPages, PackedBuffer
from nanokv.kernels.cpu_arena import append_rows
from nanokv.pool import PAGE_SIZE


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
    value_norms: torch.Tensor | None  # (B * H_q * C,) float32; packed: (S, G)
    starts: torch.Tensor  # (B, H_kv) int64: each (sequence, head) row's first flat slot
    lengths: torch.Tensor  # (B, H_kv) int32: a view of the arena's lengths of this layer


@dataclass(frozen=True)
class RowOffsets:
    """Where one layer's rows lie in its buffers, for a kernel that reads them in place (a
    rectangle's or a packed layer's alike): row r = b * H_kv + h's slot j has its key at
    keys[key_base[r] + j * D] (elements) and query head (b, q)'s value norm of it at
    norms[norm_base[b, q] + j * norm_stride]; `width` is the C of the layer's rectangle."""

    keys: torch.Tensor
    key_base: torch.Tensor  # (B, H_kv) int64
    width: int
    norms: torch.Tensor | None  # None where the arena keeps no value norms
    norm_base: torch.Tensor | None  # (B, H_q) int64
    norm_stride: int


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
        self.group = (q_heads or kv_heads) // kv_heads  # query heads a kv head
        self._pages: list[HeadPages | None] = [None] * num_layers  # per layer, when packed
        self._room = [capacity] * num_layers  # per layer, the fewest free slots of a head (host)
        self._views: list[ArenaLayer | None] | None = None
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

    @property
    def page_count(self) -> int:
        """PAGE_SIZE-slot pages the arena's heads hold, each head's slots rounded up to whole
        pages (what the server's pool counts)."""
        total = 0
        for layer, pages in enumerate(self._pages):
            if pages is not None:
                total += pages.pages
            else:
                heads = self.lengths[layer].numel()
                total += heads * -(-self.layer_capacity(layer) // PAGE_SIZE)
        return total

    def layer_capacity(self, layer: int) -> int:
        """Slots a head of `layer` has (a packed layer: its longest head's)."""
        return _part(self.k, layer).shape[2]

    @property
    def per_layer(self) -> bool:
        """True once `shrink_layers` gave layers capacities of their own: the buffers are then
        tuples of per-layer tensors, (B, H_kv, C_l, ...) each, indexed `[layer]` as before."""
        return isinstance(self.k, tuple)

    @property
    def element_size(self) -> int:
        return _part(self.k, 0).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes held by the arena's tensors (K, V and all slot metadata)."""
        tensors = [self.k, self.v, self.pos, self.lengths, self.value_norms]
        tensors += list(self.slot_state.values())
        flat = [t for item in tensors if item is not None for t in _parts(item)]
        layouts = sum(pages.nbytes for pages in self._pages if pages is not None)
        return sum(t.numel() * t.element_size() for t in flat) + layouts

    def layer(self, index: int) -> ArenaLayer:
        """Views of one layer. Made once per buffer allocation (a decode step asks for every
        layer's), rebuilt after `shrink` / `grow` and in a copy of the arena. A packed layer's
        (`pack_heads`) are rectangular copies, gathered when first read (`PackedLayerView`)."""
        if self._pages[index] is not None:
            return PackedLayerView(self, index)
        if self._views is None:  # (none for packed layers)
            self._views = [
                None if pages is not None else self._layer_views(layer)
                for layer, pages in enumerate(self._pages)
            ]
        return self._views[index]

    def held_positions(self, seq: int) -> list[int]:
        """The positions sequence `seq` holds in any (layer, kv head), ascending."""
        held = []
        for layer in range(len(self.k)):
            view = self.layer(layer)
            pos, lengths = view.pos[seq], view.lengths[seq].long()  # (H_kv, C), (H_kv,)
            valid = torch.arange(pos.shape[-1], device=pos.device) < lengths.unsqueeze(-1)
            held.append(pos[valid])
        return torch.unique(torch.cat(held)).tolist()

    def pages(self, index: int) -> HeadPages | None:
        """Where each head's pages lie when layer `index` is packed, else None."""
        return self._pages[index]

    def row_offsets(self, index: int) -> RowOffsets:
        """Layer `index`'s keys and value norms where they lie (see `RowOffsets`)."""
        pages = self._pages[index]
        if pages is not None:
            keys = _part(self.k, index).flat  # (S, D)
            norms = None if self.value_norms is None else _part(self.value_norms, index).flat
            group = torch.arange(self.group, device=pages.starts.device)  # norms: (S, G)
            norm_base = (pages.starts.unsqueeze(-1) * self.group + group).flatten(1)
            return RowOffsets(
                keys, pages.starts * keys.shape[1], pages.width, norms, norm_base, self.group
            )
        view = self.layer(index)
        return RowOffsets(
            view.k, _row_offsets(view.k), view.k.shape[2], view.value_norms,
            None if view.value_norms is None else _row_offsets(view.value_norms),
            0 if view.value_norms is None else view.value_norms.stride(2),
        )  # fmt: skip

    def room(self, index: int) -> int:
        """The fewest slots any head of layer `index` can still take before an eviction."""
        return self._room[index]

    def _flat_rows(self, index: int) -> _FlatRows:
        """Flat views of one layer (see `_FlatRows`), cached like `layer`'s."""
        if self._flat is None:
            self._flat = [self._layer_rows(layer) for layer in range(len(self.k))]
        return self._flat[index]

    def _layer_rows(self, index: int) -> _FlatRows:
        if self._pages[index] is not None:  # packed: the flat buffers themselves
            norms = None if self.value_norms is None else _part(self.value_norms, index).flat
            return _FlatRows(
                _part(self.k, index).flat,
                _part(self.v, index).flat,
                _part(self.pos, index).flat,
                tuple(_part(buffer, index).flat for buffer in self.slot_state.values()),
                norms,
                self._pages[index].starts,
                self.lengths[index],
            )
        batch, kv_heads, capacity, head_dim = self.k[index].shape
        norms = None if self.value_norms is None else self.value_norms[index].view(-1)
        return _FlatRows(
            self.k[index].view(-1, head_dim),
            self.v[index].view(-1, head_dim),
            self.pos[index].view(-1),
            tuple(buffer[index].view(-1) for buffer in self.slot_state.values()),
            norms,
            _row_starts(batch, kv_heads, capacity, self.lengths.device),
            self.lengths[index],
        )

    def _forget_views(self) -> None:
        """After the buffers were reallocated: views are rebuilt on next use, and each
        layer's room is counted again."""
        self._views = None
        self._flat = None
        for layer in range(len(self.k)):
            self._count_room(layer)

    def _count_room(self, layer: int) -> None:
        pages = self._pages[layer]
        caps = self.layer_capacity(layer) if pages is None else pages.caps
        self._room[layer] = int((caps - self.lengths[layer].long()).min())

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

    def _edit(self, layer: int) -> _LayerEdit:
        return _LayerEdit(self, layer)

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
        pages = self._pages[layer]
        width = kept.shape[1]
        capacity = self.layer_capacity(layer) if pages is None else int(pages.caps[seq].min())
        if width > capacity:
            raise ArenaFullError(f"{width} prompt tokens do not fit {capacity} slots")
        edit = self._edit(layer)
        gather = kept.unsqueeze(-1).expand(-1, -1, head_dim)
        edit.k[seq, :, :width] = k.gather(1, gather)
        edit.v[seq, :, :width] = v.gather(1, gather)
        edit.pos[seq, :, :width] = positions[kept].to(torch.int32)
        for name in self.slot_state:
            edit.state(name)[seq] = 0
        initial = dict(state or {})
        if scores is not None:
            initial["score"] = scores
        for name, values in initial.items():
            edit.state(name)[seq, :, :width] = values.float().gather(1, kept)
        if value_norms is not None and self.value_norms is not None:
            group = value_norms.shape[0] // kv_heads
            kept_q = kept.repeat_interleave(group, dim=0)  # (H_q, m)
            edit.value_norms[seq, :, :width] = value_norms.float().gather(1, kept_q)
        edit.commit()
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
        if self._room[layer] <= 0:  # a flat index past a row would write the next
            raise ArenaFullError(f"a head of layer {layer} is full: evict first")
        rows = self._flat_rows(layer)
        slots = append_rows(rows, k, v, positions)  # one C call on a CPU, else None
        if slots is None:
            slots = self._append_with_torch(rows, k, v, positions)
        if value_norms is not None and rows.value_norms is not None:
            flat = (rows.starts + slots).view(-1)  # (B H_kv,)
            self._append_value_norms(layer, rows.value_norms, slots, flat, value_norms)
        self._room[layer] -= 1
        return slots

    @staticmethod
    def _append_with_torch(
        rows: _FlatRows, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """`append`'s writes as indexed copies (what kernels/cpu_arena.c does in one call)."""
        lengths = rows.lengths
        slots = lengths.long()  # (B, H_kv)
        kv_heads = slots.shape[1]
        flat = (rows.starts + slots).view(-1)  # (B H_kv,)
        head_dim = k.shape[-1]
        rows.k.index_copy_(0, flat, k.reshape(-1, head_dim))
        rows.v.index_copy_(0, flat, v.reshape(-1, head_dim))
        rows.pos.index_copy_(0, flat, positions.to(torch.int32).repeat_interleave(kv_heads))
        for buffer in rows.slot_state:
            buffer.index_fill_(0, flat, 0)
        lengths.add_(1)
        return slots

    def _append_value_norms(
        self,
        layer: int,
        norms: torch.Tensor,
        slots: torch.Tensor,
        flat: torch.Tensor,
        value_norms: torch.Tensor,
    ) -> None:
        """`append`'s value norms (B, H_q) at `slots` (B, H_kv) (flat: their flat kv slots)."""
        if self._pages[layer] is not None:  # packed: (S, G), a kv slot's row of G norms
            norms.index_copy_(0, flat, value_norms.reshape(flat.shape[0], -1).float())
            return
        batch, q_heads = value_norms.shape
        q_slots = slots.repeat_interleave(self.group, dim=1)  # (B, H_q)
        capacity = norms.shape[0] // (batch * q_heads)
        q_flat = (_row_starts(batch, q_heads, capacity, slots.device) + q_slots).view(-1)
        norms.index_copy_(0, q_flat, value_norms.reshape(-1).float())

    def write_value_norms(self, layer: int, slots: torch.Tensor, norms: torch.Tensor) -> None:
        """Value norms (B, H_q, n) of the tokens at `slots` (B, H_kv, n)."""
        pages = self._pages[layer]
        if pages is not None:  # in place in the flat (S, G) buffer
            batch, q_heads, n = norms.shape
            per_slot = norms.float().view(batch, q_heads // self.group, self.group, n)
            flat = _part(self.value_norms, layer).flat
            flat[pages.flat_slots(slots)] = per_slot.transpose(-1, -2).to(flat.dtype)
            return
        edit = self._edit(layer)
        q_slots = slots.long().repeat_interleave(self.group, dim=1)
        edit.value_norms.scatter_(2, q_slots, norms.float())
        edit.commit()

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
        edit = self._edit(layer)
        head_dim = edit.k.shape[-1]
        vector_index = source.unsqueeze(-1).expand(-1, -1, head_dim)
        for buffer in (edit.k, edit.v):
            buffer[seq, :, :m] = buffer[seq].gather(1, vector_index)
        for buffer in (edit.pos, *edit.states()):
            buffer[seq, :, :m] = buffer[seq].gather(1, source)
        if self.value_norms is not None:
            norms = edit.value_norms[seq]  # (H_q, C)
            norms[:, :m] = norms.gather(1, source.repeat_interleave(self.group, dim=0))
        edit.commit()
        self.set_lengths(layer, kept_counts.view(1, -1), seq=seq)

    def scatter(self, layer: int, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Moves slot contents src -> dst per (seq, kv head) without changing lengths.

        src_slots, dst_slots: (B, H_kv, w). Used by multi-step eviction: the decode window's
        tokens are scattered into the slots freed by the victims, then `set_lengths` drops the
        window area. A source equal to its destination is a no-op; otherwise they must not
        overlap.
        """
        src, dst = src_slots.long(), dst_slots.long()
        pages = self._pages[layer]
        if pages is not None:  # in place in the flat buffers: no rectangle gathered
            src, dst = pages.flat_slots(src).flatten(), pages.flat_slots(dst).flatten()
            for buffer in self._buffers():
                flat = _part(buffer, layer).flat
                flat[dst] = flat[src]
            return
        edit = self._edit(layer)
        head_dim = edit.k.shape[-1]
        src_vec = src.unsqueeze(-1).expand(-1, -1, -1, head_dim)
        dst_vec = dst.unsqueeze(-1).expand(-1, -1, -1, head_dim)
        for buffer in (edit.k, edit.v):
            buffer.scatter_(2, dst_vec, buffer.gather(2, src_vec))
        for buffer in (edit.pos, *edit.states()):
            buffer.scatter_(2, dst, buffer.gather(2, src))
        if self.value_norms is not None:
            src_q = src.repeat_interleave(self.group, dim=1)
            dst_q = dst.repeat_interleave(self.group, dim=1)
            edit.value_norms.scatter_(2, dst_q, edit.value_norms.gather(2, src_q))
        edit.commit()

    def values_at(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, n, D) the values held at `slots` (B, H_kv, n) of `layer`."""
        pages = self._pages[layer]
        if pages is not None:
            return _part(self.v, layer).flat[pages.flat_slots(slots)]
        values = _part(self.v, layer)  # (B, H_kv, C, D)
        index = slots.long().unsqueeze(-1).expand(-1, -1, -1, values.shape[-1])
        return values.gather(2, index)

    def _buffers(self) -> list[Buffer]:
        """Every per-slot buffer: K, V, positions, the slot statistics, value norms if kept."""
        buffers = [self.k, self.v, self.pos, *self.slot_state.values()]
        return buffers + ([self.value_norms] if self.value_norms is not None else [])

    def set_lengths(self, layer: int, lengths: torch.Tensor, seq: int | None = None) -> None:
        """Sets each head's length, (B, H_kv) (or (1, H_kv) for one `seq`), marking the slots
        past it empty."""
        rows = slice(None) if seq is None else slice(seq, seq + 1)
        edit = self._edit(layer)
        slots = torch.arange(self.layer_capacity(layer), device=lengths.device)
        beyond = slots.view(1, 1, -1) >= lengths.unsqueeze(-1)
        edit.pos[rows].masked_fill_(beyond, -1)
        edit.commit()
        self.lengths[layer, rows] = lengths.to(torch.int32)
        self._count_room(layer)

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
        edit = self._edit(layer)
        edit.k[seq, heads, slot] = k.to(edit.k.dtype)
        edit.v[seq, heads, slot] = v.to(edit.v.dtype)
        edit.pos[seq, heads, slot] = pos
        if score is not None:
            edit.state("score")[seq, heads, slot] = score
        edit.commit()

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
        edit = self._edit(layer)
        edit.k.scatter_(2, index, k.unsqueeze(2).to(edit.k.dtype))  # (B, H_kv, 1, D)
        edit.v.scatter_(2, index, v.unsqueeze(2).to(edit.v.dtype))
        edit.state("score").scatter_(-1, slot.unsqueeze(-1), score.unsqueeze(-1))
        edit.commit()

    def set_slot_state(self, layer: int, rows: dict[str, torch.Tensor]) -> None:
        """Replaces per-slot statistics of `layer`: name -> (B, H_kv, C) values (what a policy
        returned from a decode step)."""
        edit = self._edit(layer)
        for name, values in rows.items():
            edit.state(name).copy_(values)
        edit.commit()

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
        self._unpack()
        held = self.lengths.amax(dim=(1, 2)).tolist()
        wanted = [
            min(max(c, h), self.layer_capacity(layer))
            for layer, (c, h) in enumerate(zip(capacities, held, strict=True))
        ]
        if all(c == self.layer_capacity(layer) for layer, c in enumerate(wanted)):
            return
        cut = _stacked if len(set(wanted)) == 1 and not self.per_layer else _layered
        self._map_buffers(lambda buffer, vector, fill: cut(buffer, wanted, vector=vector))

    def pack_heads(self, needed: torch.Tensor) -> None:
        """Sizes every head to what it needs, (L, B, H_kv) slots: a layer whose heads need the
        same keeps a rectangle that wide (`shrink_layers`); in any other layer each head gets
        its own whole pages (`head_pages.py`), so that a head costs what it holds."""
        needed = torch.maximum(needed.long(), self.lengths.long())
        self.shrink_layers(needed.amax(dim=(1, 2)).tolist())
        packed = {}
        for layer in range(len(self.k)):
            row = needed[layer]
            if bool((row == row.flatten()[0]).all()):
                continue  # every head needs the same: the rectangle is exact
            pages = HeadPages.for_slots(row)
            if pages.slots < row.numel() * self.layer_capacity(layer):
                packed[layer] = pages
        if not packed:
            return
        widths = [self.layer_capacity(layer) for layer in range(len(self.k))]
        self._map_buffers(
            lambda buffer, vector, fill: (
                buffer
                if isinstance(buffer, LayerStack)
                else _layered(buffer, widths, vector=vector)
            )
        )

        def pack(buffer: Buffer, vector: bool, fill: float) -> LayerStack:
            group = self.group if buffer is self.value_norms else None
            return LayerStack(
                PackedBuffer.pack(part, packed[layer], fill, group) if layer in packed else part
                for layer, part in enumerate(buffer.parts())
            )

        self._pages = [packed.get(layer) for layer in range(len(self.k))]
        self._map_buffers(pack)

    def _unpack(self) -> None:
        """Turns packed layers back into rectangles (before a reallocation)."""
        if all(pages is None for pages in self._pages):
            return

        def unpack(buffer: Buffer, vector: bool, fill: float) -> LayerStack:
            return LayerStack(buffer)  # iterating gathers the packed layers

        self._map_buffers(unpack)
        self._pages = [None] * len(self.k)
        self._forget_views()

    def _map_buffers(self, reallocate) -> None:
        """Replaces every buffer by `reallocate(buffer, vector, fill)` (vector: it holds a
        vector a slot; fill: what an empty slot holds) and rebuilds the views."""
        self.k = reallocate(self.k, True, 0)
        self.v = reallocate(self.v, True, 0)
        self.pos = reallocate(self.pos, False, -1)
        self.slot_state = {
            name: reallocate(buffer, False, 0) for name, buffer in self.slot_state.items()
        }
        self.score = self.slot_state["score"]
        if self.value_norms is not None:
            self.value_norms = reallocate(self.value_norms, False, 0)
        self._forget_views()

    def grow(self, capacity: int) -> None:
        """Reallocates every buffer with `capacity` slots, keeping every slot and marking the new
        ones empty: `shrink`'s counterpart, for an arena that must take more tokens than it was
        sized for (a conversation grows it at most once a turn, before the turn is written).
        Per-layer and packed buffers become stacked again."""
        if capacity <= self.capacity and not self.per_layer:
            return
        self._unpack()
        capacity = max(capacity, self.capacity)
        self._map_buffers(
            lambda buffer, vector, fill: _padded(buffer, capacity, vector=vector, value=fill)
        )


class _LayerEdit:
    """One layer's buffers as rectangles (B, H_kv, C, ...) to edit in place: views of a
    rectangular layer, or for a packed layer copies gathered on first use and written back by
    `commit`."""

    def __init__(self, arena: KVArena, layer: int) -> None:
        self._arena, self._layer = arena, layer
        self._taken: dict[str, tuple[PackedBuffer, torch.Tensor]] = {}

    def _take(self, name: str, buffer: Buffer) -> torch.Tensor:
        part = _part(buffer, self._layer)
        if not isinstance(part, PackedBuffer):
            return part
        if name not in self._taken:
            self._taken[name] = (part, part.gather())
        return self._taken[name][1]

    @property
    def k(self) -> torch.Tensor:
        return self._take("k", self._arena.k)

    @property
    def v(self) -> torch.Tensor:
        return self._take("v", self._arena.v)

    @property
    def pos(self) -> torch.Tensor:
        return self._take("pos", self._arena.pos)

    @property
    def value_norms(self) -> torch.Tensor:
        return self._take("value_norms", self._arena.value_norms)

    def state(self, name: str) -> torch.Tensor:
        return self._take(f"state:{name}", self._arena.slot_state[name])

    def states(self) -> list[torch.Tensor]:
        return [self.state(name) for name in self._arena.slot_state]

    def commit(self) -> None:
        for part, rect in self._taken.values():
            part.store(rect)
        self._taken.clear()


def _gathered(name: str) -> functools.cached_property:
    """A `PackedLayerView` field: the arena buffer `name` of the view's layer as a rectangle,
    gathered on first read (None when the arena has no such buffer)."""

    def read(view: PackedLayerView) -> torch.Tensor | None:
        buffer = getattr(view._arena, name)
        return None if buffer is None else view._part(buffer).gather()

    return functools.cached_property(read)


class PackedLayerView:
    """`ArenaLayer` of a packed layer: the same fields as rectangles (B, H_kv, C, ...), each
    gathered when first read, plus the flat buffers the decode step attends to in place."""

    k = _gathered("k")
    v = _gathered("v")
    pos = _gathered("pos")
    score = _gathered("score")
    value_norms = _gathered("value_norms")

    def __init__(self, arena: KVArena, layer: int) -> None:
        self.pages: HeadPages = arena.pages(layer)
        self._arena, self._layer = arena, layer

    def _part(self, buffer: Buffer) -> PackedBuffer:
        return _part(buffer, self._layer)

    @functools.cached_property
    def lengths(self) -> torch.Tensor:
        """(B, H_kv) int32 (a view of the arena's; the decode step's attention does not read
        it: a slot past its row's length holds position -1)."""
        return self._arena.lengths[self._layer]

    @functools.cached_property
    def state(self) -> dict[str, torch.Tensor]:
        return {
            name: self._part(buffer).gather()
            for name, buffer in self._arena.slot_state.items()
            if name != "score"
        }

    @property
    def flat_k(self) -> torch.Tensor:
        """(S, D): the layer's keys where they lie."""
        return self._part(self._arena.k).flat

    @property
    def flat_v(self) -> torch.Tensor:
        return self._part(self._arena.v).flat

    @property
    def flat_pos(self) -> torch.Tensor:
        """(S,) int32."""
        return self._part(self._arena.pos).flat


class LayerStack(tuple):
    """One tensor a layer, (B, H_kv, C_l, ...) each: an arena buffer after `shrink_layers`, or
    a packed layer's `PackedBuffer` (`pack_heads`). Indexed like the stacked buffer it replaces
    when the first index is a layer: `stack[layer]` is that layer's tensor (a packed layer's
    rectangle, gathered: a read-only copy) and `stack[layer, seq, head, :n]` indexes into it.
    `part(layer)` is what the layer holds."""

    def __getitem__(self, key):
        if isinstance(key, tuple) and key and isinstance(key[0], int):
            return self[key[0]][key[1:]]
        item = tuple.__getitem__(self, key)
        return item.gather() if isinstance(item, PackedBuffer) else item

    def __iter__(self):
        return (self[layer] for layer in range(len(self)))

    def part(self, layer: int) -> torch.Tensor | PackedBuffer:
        return tuple.__getitem__(self, layer)

    def parts(self) -> tuple[torch.Tensor | PackedBuffer, ...]:
        return tuple(tuple.__iter__(self))

    def clone(self) -> LayerStack:
        return LayerStack(t.clone() for t in self.parts())

    def element_size(self) -> int:
        return self.part(0).element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.part(0).dtype

    def equal(self, other: LayerStack) -> bool:
        """Same layers, shapes and values (what `torch.equal` says of stacked buffers)."""
        return len(self) == len(other) and all(
            a.equal(b) if isinstance(a, PackedBuffer) else torch.equal(a, b)
            for a, b in zip(self.parts(), other.parts(), strict=True)
        )


Buffer = torch.Tensor | LayerStack  # stacked (L, ...) or one tensor a layer


def same_buffer(a: Buffer, b: Buffer) -> bool:
    """`torch.equal` for arena buffers, stacked or one tensor a layer."""
    if isinstance(a, LayerStack) or isinstance(b, LayerStack):
        return isinstance(a, LayerStack) and isinstance(b, LayerStack) and a.equal(b)
    return torch.equal(a, b)


def _row_offsets(rect: torch.Tensor) -> torch.Tensor:
    """(B, H) int64: the element offset of each row's first slot in a (B, H, C, ...) view."""
    batch, heads = rect.shape[:2]
    rows = torch.arange(batch, device=rect.device).unsqueeze(1) * rect.stride(0)
    return rows + torch.arange(heads, device=rect.device) * rect.stride(1)


def _parts(buffer: Buffer) -> tuple[torch.Tensor | PackedBuffer, ...]:
    return buffer.parts() if isinstance(buffer, LayerStack) else (buffer,)


def _part(buffer: Buffer, layer: int) -> torch.Tensor | PackedBuffer:
    """What layer `layer` of a buffer holds: a view of the stacked tensor, a layer's tensor, or
    a packed layer's `PackedBuffer`."""
    return buffer.part(layer) if isinstance(buffer, LayerStack) else buffer[layer]


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
