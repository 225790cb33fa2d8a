"""Packed arena layers: each (sequence, kv head) row of a layer holds only its own slots.

A `global` or `layer` selection keeps very different counts in the heads of one layer. A
rectangle (B, H_kv, C, ...) as wide as the largest head makes every head pay for that one; a
packed layer instead gives each row its own run of slots in one flat buffer per statistic, as
long as the row needs, so that a head costs what it holds. A row's slots are adjacent: the
decode step attends over the flat buffer as it is
(`kernels/packed_attention.py`), a multi-step eviction moves its slots there too (`flat_slots`),
and the rarer edits (compaction, the reconstructed slot, statistics) work on a rectangular copy,
gathered and written back (`PackedBuffer.gather` / `store`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from math import inf

import torch

from nanokv.pool import PAGE_SIZE

ROW_BIAS_CACHED = 1 << 20  # most elements of a packed layer's attention bias held with it


@dataclass(frozen=True)
class HeadPages:
    """Where each (sequence, kv head) row of one packed layer lives in the layer's flat buffers:
    rows one after another, each exactly as long as it needs."""

    starts: torch.Tensor  # (B, H_kv) int64: the row's first flat slot
    caps: torch.Tensor  # (B, H_kv) int64: the row's slots
    row_of_slot: torch.Tensor  # (S,) int16 (int32 past 32767 rows): b * H_kv + h of a flat slot
    _query_rows: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    _row_bias: dict[tuple, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def for_slots(cls, needed: torch.Tensor) -> HeadPages:
        """The layout for rows that need `needed` (B, H_kv) slots each (at least one)."""
        caps = needed.long().clamp_min(1)
        sizes = caps.flatten()
        starts = (torch.cumsum(sizes, 0) - sizes).view_as(caps)
        dtype = torch.int16 if sizes.numel() <= torch.iinfo(torch.int16).max else torch.int32
        rows = torch.arange(sizes.numel(), device=caps.device, dtype=dtype)
        return cls(starts, caps, rows.repeat_interleave(sizes))

    @property
    def slots(self) -> int:
        """Slots of the layer's flat buffers: every row's."""
        return self.row_of_slot.numel()

    @functools.cached_property
    def width(self) -> int:
        """Slots of the longest row: the C of the rectangle `PackedBuffer.gather` makes."""
        return int(self.caps.max())

    @property
    def pages(self) -> int:
        """PAGE_SIZE-slot pages the rows make, each row rounded up to whole pages (what the
        server's pool counts)."""
        return int((-(-self.caps // PAGE_SIZE)).sum())

    @property
    def nbytes(self) -> int:
        """Bytes the layout itself holds (a row id a slot, a start and a size a row)."""
        tensors = (self.starts, self.caps, self.row_of_slot)
        return sum(t.numel() * t.element_size() for t in tensors)

    @functools.cached_property
    def rectangle(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, inside), each (B, H_kv, C): the flat slot of each rectangle slot (clamped
        in its row) and whether the row has that slot. Made once for the layout: a settle and
        an eviction gather every statistic of the layer through it."""
        slots = torch.arange(self.width, device=self.caps.device)
        inside = slots < self.caps.unsqueeze(-1)
        index = self.starts.unsqueeze(-1) + torch.minimum(slots, self.caps.unsqueeze(-1) - 1)
        return index, inside

    def query_rows(self, group: int) -> torch.Tensor:
        """(B * H_q, 1): the row of each query head's kv head, `group` query heads a kv head."""
        if group not in self._query_rows:
            rows = torch.arange(self.starts.numel(), device=self.starts.device)
            self._query_rows[group] = rows.repeat_interleave(group).unsqueeze(1)
        return self._query_rows[group]

    def own_rows(self, group: int) -> torch.Tensor:
        """Bool (B * H_q, S): query head (b, h) and flat slot s share a row (its kv head's)."""
        return self.query_rows(group) == self.row_of_slot

    def row_bias(self, group: int, dtype: torch.dtype) -> torch.Tensor | None:
        """(B * H_q, S) additive attention bias in `dtype`: 0 on a query head's own row, -inf
        elsewhere (`own_rows`), so that one addmm gives masked logits. Made once for this
        layout (a new one comes with each eviction) and held with it; None past
        `ROW_BIAS_CACHED` elements (many sequences), where a caller masks instead of holding a
        bias as large as the logits."""
        if self.row_of_slot.numel() * self.starts.numel() * group > ROW_BIAS_CACHED:
            return None
        key = (group, dtype)
        if key not in self._row_bias:
            own = self.own_rows(group)
            bias = torch.zeros(own.shape, dtype=dtype, device=own.device)
            self._row_bias[key] = bias.masked_fill_(~own, -inf)
        return self._row_bias[key]

    def flat_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Flat slots of row slots `slots` (B, H_kv, ...) (each inside its row)."""
        starts = self.starts.view(*self.starts.shape, *([1] * (slots.dim() - 2)))
        return starts + slots.long()


class PackedBuffer:
    """One statistic of a packed layer: flat storage (S, *trailing), shown as the rectangle
    (B, H_kv, C, *trailing) (value norms, stored (S, G), as (B, H_q, C)). Slots past a row's
    pages read as `fill` in the rectangle."""

    def __init__(
        self, flat: torch.Tensor, pages: HeadPages, fill: float = 0, group: int | None = None
    ) -> None:
        self.flat, self.pages, self.fill, self.group = flat, pages, fill, group

    @classmethod
    def pack(
        cls, rect: torch.Tensor, pages: HeadPages, fill: float = 0, group: int | None = None
    ) -> PackedBuffer:
        """The rows of a rectangle, each cut to its pages (a rectangle narrower than a row's
        pages leaves the rest at `fill`)."""
        trailing = rect.shape[3:] if group is None else (group,)
        flat = torch.full((pages.slots, *trailing), fill, dtype=rect.dtype, device=rect.device)
        packed = cls(flat, pages, fill, group)
        packed.store(rect)
        return packed

    def gather(self) -> torch.Tensor:
        """A rectangular copy, (B, H_kv, C, *trailing) (value norms: (B, H_q, C))."""
        index, inside = self.pages.rectangle
        rect = self.flat[index]  # (B, H_kv, C, *trailing)
        outside = ~inside.view(*inside.shape, *([1] * (rect.dim() - 3)))
        rect = rect.masked_fill(outside, self.fill)
        if self.group is None:
            return rect
        batch, kv_heads, width, group = rect.shape
        return rect.permute(0, 1, 3, 2).reshape(batch, kv_heads * group, width)

    def store(self, rect: torch.Tensor) -> None:
        """Writes a rectangle's slots that lie in their rows' pages back (any width)."""
        if self.group is not None:  # (B, H_q, C) -> (B, H_kv, C, G)
            batch, q_heads, width = rect.shape
            rect = rect.view(batch, q_heads // self.group, self.group, width).permute(0, 1, 3, 2)
        pages = self.pages
        slots = torch.arange(rect.shape[2], device=rect.device)
        mine = slots < pages.caps.unsqueeze(-1)  # (B, H_kv, C')
        self.flat[pages.flat_slots(slots.expand_as(mine))[mine]] = rect[mine].to(self.flat.dtype)

    def __getitem__(self, key):
        return self.gather()[key]

    @property
    def shape(self) -> torch.Size:
        batch, kv_heads = self.pages.caps.shape
        width = self.pages.width
        if self.group is None:
            return torch.Size((batch, kv_heads, width, *self.flat.shape[1:]))
        return torch.Size((batch, kv_heads * self.group, width))

    @property
    def dtype(self) -> torch.dtype:
        return self.flat.dtype

    def element_size(self) -> int:
        return self.flat.element_size()

    def numel(self) -> int:
        return self.flat.numel()

    def clone(self) -> PackedBuffer:
        return PackedBuffer(self.flat.clone(), self.pages, self.fill, self.group)

    def equal(self, other: object) -> bool:
        return (
            isinstance(other, PackedBuffer)
            and torch.equal(self.pages.caps, other.pages.caps)
            and torch.equal(self.flat, other.flat)
        )
