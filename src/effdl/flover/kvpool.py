"""KV-cache slots and Flover's memory shuffle.

The cache is preallocated as ``[layers, slots, kv_heads, max_len, head_dim]``;
a live request owns one slot. The decode forward attends over one contiguous
range of slots, so holes left by finished requests cost as much as live rows.
``plan_shuffle`` decides the fewest moves that make the live slots contiguous;
``SlotTable`` is the scheduler's bookkeeping of who owns which slot, and
``KVPool`` holds the tensors and carries the moves out. ``BlockStore`` holds
the prefix cache's blocks and copies them to and from slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from effdl.core.config import ModelConfig
from effdl.core.transformer import KVCache

Move = tuple[int, int]  # (src slot, dst slot)


def plan_shuffle(live: Sequence[bool]) -> list[Move]:
    """The fewest moves that make the live slots one contiguous window.

    With k live slots, the target is the length-k window holding the most live
    slots; every live slot outside it moves into one of its holes. That count,
    k - max occupancy, is also a lower bound (each move fills at most one hole
    of whatever window ends up live), so the plan is minimal. Moves apply in
    order; each has a live source and a free destination at that moment.
    Cost: O(n) for n slots (a sliding window count).
    """
    n, k = len(live), sum(map(bool, live))
    if k == 0 or k == n:
        return []
    occupancy = sum(map(bool, live[:k]))
    best_start, best = 0, occupancy
    for start in range(1, n - k + 1):
        occupancy += bool(live[start + k - 1]) - bool(live[start - 1])
        if occupancy > best:
            best_start, best = start, occupancy
    window = range(best_start, best_start + k)
    holes = [s for s in window if not live[s]]
    strays = [s for s in range(n) if live[s] and s not in window]
    return list(zip(strays, holes, strict=True))


def live_span(live: Sequence[bool]) -> tuple[int, int]:
    """The smallest slot range [lo, hi) holding every live slot ((0, 0) when none is live)."""
    owned = [s for s, is_live in enumerate(live) if is_live]
    return (owned[0], owned[-1] + 1) if owned else (0, 0)


class SlotTable:
    """Which request owns each slot: pure bookkeeping, no tensors (the scheduler's view)."""

    def __init__(self, n_slots: int):
        self.owner: list[str | None] = [None] * n_slots
        self.n_slots = n_slots

    @property
    def live(self) -> list[bool]:
        return [o is not None for o in self.owner]

    @property
    def n_free(self) -> int:
        return self.owner.count(None)

    def allocate(self, request_id: str) -> int:
        """Give ``request_id`` the free slot that widens the live span least (ties: the lowest)."""
        lo, hi = live_span(self.live)
        free = [s for s, o in enumerate(self.owner) if o is None]
        if not free:
            raise RuntimeError("no free KV slot")
        slot = min(free, key=lambda s: (max(hi, s + 1) - min(lo, s) if hi > lo else 1, s))
        self.owner[slot] = request_id
        return slot

    def release(self, slot: int) -> None:
        self.owner[slot] = None

    def move(self, src: int, dst: int) -> None:
        assert self.owner[src] is not None and self.owner[dst] is None, (src, dst)
        self.owner[dst], self.owner[src] = self.owner[src], None


class KVPool:
    """The preallocated cache ``k, v: (L, slots, K, max_len, Dh)`` and the slot copy the shuffle needs."""

    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        self.cache = KVCache.allocate(cfg, n_slots, max_len, device=device, dtype=dtype)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (all layers)."""
        for t in (self.cache.k, self.cache.v):
            t[:, dst, :, :length] = t[:, src, :, :length]


class BlockStore:
    """The prefix cache's K/V: ``k, v: (L, rows, K, block_size, Dh)``, one row per cached prompt block.

    The runner's half of prefix caching: ``PrefixIndex`` (the scheduler's)
    says which row holds which block; this only copies whole blocks between
    rows and a slot's positions, same dtype and device as the pool.
    """

    def __init__(self, cfg: ModelConfig, rows: int, block_size: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        shape = (cfg.n_layers, rows, cfg.n_kv_heads, block_size, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.rows, self.block_size = rows, block_size

    def load(self, pool: KVPool, slot: int, first: int, rows: list[int]) -> None:
        """Slot ``slot``'s blocks first, first + 1, ... <- store ``rows`` (all layers). Cost: one copy of them."""
        lo, hi = first * self.block_size, (first + len(rows)) * self.block_size
        index = torch.tensor(rows, device=self.k.device)
        for store, cache in ((self.k, pool.cache.k), (self.v, pool.cache.v)):
            blocks = store.index_select(1, index)  # (L, n, K, B, Dh)
            L, n, K, B, Dh = blocks.shape
            cache[:, slot, :, lo:hi] = blocks.permute(0, 2, 1, 3, 4).reshape(L, K, n * B, Dh)

    def save(self, pool: KVPool, slot: int, first: int, rows: list[int]) -> None:
        """Store ``rows`` <- slot ``slot``'s blocks first, first + 1, ... (all layers). Cost: one copy of them."""
        lo, hi = first * self.block_size, (first + len(rows)) * self.block_size
        index = torch.tensor(rows, device=self.k.device)
        for store, cache in ((self.k, pool.cache.k), (self.v, pool.cache.v)):
            positions = cache[:, slot, :, lo:hi]  # (L, K, n*B, Dh)
            L, K, _, Dh = positions.shape
            blocks = positions.reshape(L, K, len(rows), self.block_size, Dh).permute(0, 2, 1, 3, 4)
            store.index_copy_(1, index, blocks)  # (L, n, K, B, Dh) into rows
