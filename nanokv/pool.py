"""KVPool: the server's fixed KV memory, counted in pages, handed to requests and taken back.

The pool is sized once, at start-up, from `--kv-memory` (bytes) or `--max-kv-tokens`. A page is
PAGE_SIZE slots of one (layer, kv head) of one sequence (Quest's page size). A request holds the
pages of its arena: reserved in full when it is admitted (the arena's largest size, before it
shrinks after prefill), trimmed when the arena shrinks, and returned when the request finishes,
is cancelled or fails. The scheduler admits a request only when its pages fit; a request whose
pages exceed the whole pool can never run and is refused.

Pages are counted per (layer, kv head) row of a sequence's arena. Before prefill a reservation
is planned from the budget (each head at the mean count of a `layer`/`global` selection); after
it, the request holds what its arena holds: a layer whose heads kept different counts is packed
(`KVArena.pack_heads`), each head only its own slots, so a `global` selection costs about its
budget plus the decode window, not its largest head's share for every head. The pool counts
bytes; it does not place them (each request's arena is its own tensors).
"""

from __future__ import annotations

import math
import re
import threading

PAGE_SIZE = 16  # slots of one (layer, kv head) in a page: Quest's page size


class PoolFullError(RuntimeError):
    """The pool cannot hold a reservation now (or, with `never=True`, ever)."""

    def __init__(self, message: str, never: bool = False) -> None:
        super().__init__(message)
        self.never = never


def pages_for(num_layers: int, kv_heads: int, capacity: int) -> int:
    """Pages an arena of `capacity` slots a (layer, kv head) holds."""
    return num_layers * kv_heads * math.ceil(capacity / PAGE_SIZE)


class KVPool:
    """A fixed number of bytes, handed out in whole pages per request id; thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"the KV pool needs a positive size, got {capacity_bytes} bytes")
        self.capacity_bytes = int(capacity_bytes)
        self._held: dict[int, tuple[int, int]] = {}  # owner -> (pages, bytes)
        self._lock = threading.Lock()
        self.peak_bytes = 0  # the most held at once since creation or `reset_peak`

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(nbytes for _, nbytes in self._held.values())

    @property
    def used_pages(self) -> int:
        with self._lock:
            return sum(pages for pages, _ in self._held.values())

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def holders(self) -> dict[int, tuple[int, int]]:
        """owner -> (pages, bytes) of every live reservation."""
        with self._lock:
            return dict(self._held)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_bytes = sum(nbytes for _, nbytes in self._held.values())

    def _note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, sum(nbytes for _, nbytes in self._held.values()))

    def reserve(self, owner: int, pages: int, nbytes: int) -> None:
        """Reserves `pages` pages (`nbytes` bytes) for `owner`. PoolFullError when they do not fit
        now (`never` when they exceed the whole pool); ValueError for an owner already holding."""
        with self._lock:
            if owner in self._held:
                raise ValueError(f"request {owner} already holds pool pages")
            used = sum(b for _, b in self._held.values())
            if nbytes > self.capacity_bytes:
                raise PoolFullError(
                    f"the request's KV cache needs {nbytes} bytes but the whole pool holds "
                    f"{self.capacity_bytes}: lower max_tokens or kv_budget, or raise --kv-memory",
                    never=True,
                )
            if used + nbytes > self.capacity_bytes:
                free = self.capacity_bytes - used
                raise PoolFullError(f"{nbytes} bytes do not fit the pool's free {free}")
            self._held[owner] = (pages, nbytes)
            self._note_peak()

    def resize(self, owner: int, pages: int, nbytes: int) -> None:
        """Trims (or grows, when it fits) `owner`'s reservation to `pages` / `nbytes`."""
        with self._lock:
            if owner not in self._held:
                raise KeyError(f"request {owner} holds no pool pages")
            used = sum(b for _, b in self._held.values()) - self._held[owner][1]
            if used + nbytes > self.capacity_bytes:
                raise PoolFullError(f"growing request {owner} to {nbytes} bytes does not fit")
            self._held[owner] = (pages, nbytes)
            self._note_peak()

    def release(self, owner: int) -> int:
        """Returns all of `owner`'s pages; the bytes freed (0 if it held none)."""
        with self._lock:
            _, nbytes = self._held.pop(owner, (0, 0))
            return nbytes


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """Bytes from '2GiB', '512MiB', '1.5GB', '1000000': binary units with 'i', decimal without."""
    try:
        value = int(float(text))  # a plain number of bytes: 4096, 1e9
    except (TypeError, ValueError):
        value = None
    if value is not None:
        if value <= 0:
            raise ValueError(f"memory size {text!r} must be positive")
        return value
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"memory size {text!r} is not understood: write e.g. 2GiB, 512MiB or 1e9")
    number, unit = float(match.group(1)), match.group(2).upper()
    binary = "I" in unit
    letter = unit.replace("I", "").replace("B", "")
    scale = 1024 ** ("KMGT".index(letter) + 1) if binary and letter else _UNITS[letter]
    value = int(number * scale)
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return value
