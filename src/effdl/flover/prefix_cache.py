"""Automatic prefix caching, the scheduler's half: which prompt blocks have their K/V in the block store.

A prompt is cut into blocks of ``block_size`` tokens; block i's key hashes
(key of block i-1, its tokens), so one key names a whole prefix, as vLLM's
block hashes do. ``PrefixIndex`` maps keys to rows of the runner's block
store (``runner.BlockStore``) and keeps them in LRU order. It holds no
tensors: the scheduler asks it what to load into a newly admitted request's
slot and what to save from a prefilled one, and puts the copies in the plan.

Eviction is leaves first. Every touch covers a chain from the first block
down, and stamps a block as more recent than its descendants, so the least
recently used block never has a cached child and evicting it leaves no
block unreachable. ``discard`` (a block whose contents never arrived) drops
the block with its descendants.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from effdl.errors import EffdlError

ROOT = 0  # the parent key of a prompt's first block
BLOCK_SIZE = 16  # tokens per block, as vLLM's default


def block_keys(tokens: Sequence[int], block_size: int) -> list[int]:
    """The chained keys of the full blocks of ``tokens``: key i names tokens[: (i + 1) * block_size].

    Python's hash of a tuple of ints does not depend on PYTHONHASHSEED, so
    keys agree across processes. A collision cannot serve wrong K/V: the
    index also compares each block's parent and tokens. Cost: O(len(tokens)).
    """
    keys, parent = [], ROOT
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start:start + block_size])))
        keys.append(parent)
    return keys


@dataclass
class _Block:
    parent: int
    tokens: tuple[int, ...]
    row: int  # its row in the runner's block store
    children: set[int] = field(default_factory=set)


class PrefixIndex:
    """Cached prompt blocks -> block-store rows, at most ``capacity`` of them, evicted least recently used first."""

    def __init__(self, capacity: int, block_size: int = BLOCK_SIZE):
        if capacity <= 0 or block_size <= 0:
            raise EffdlError(f"the prefix cache needs a positive capacity and block size, got {capacity} blocks "
                             f"of {block_size} tokens")
        self.capacity, self.block_size = capacity, block_size
        self.blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self.free_rows: list[int] = []  # rows freed by ``discard``
        self.next_row = 0  # rows from here on were never used: a huge capacity costs nothing until filled

    def __len__(self) -> int:
        return len(self.blocks)

    def _match(self, tokens: Sequence[int], keys: Sequence[int], limit: int) -> list[int]:
        """Keys of the longest cached run of the first ``limit`` blocks. Cost: O(matched tokens)."""
        matched, parent, b = [], ROOT, self.block_size
        for i, key in enumerate(keys[:limit]):
            block = self.blocks.get(key)
            if block is None or block.parent != parent or block.tokens != tuple(tokens[i * b:(i + 1) * b]):
                break
            matched.append(key)
            parent = key
        return matched

    def _touch(self, chain: Sequence[int]) -> None:
        """Mark a chain (first block first) used now, each block more recent than its descendants. Cost: O(len)."""
        for key in reversed(chain):
            self.blocks.move_to_end(key)

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """Block-store rows of the longest cached prefix of whole blocks, leaving at least the last token out.

        The request must compute at least one token itself to get logits, so a
        prompt of exactly k blocks matches at most k - 1. Cost: O(len(tokens)).
        """
        keys = block_keys(tokens, self.block_size)
        chain = self._match(tokens, keys, (len(tokens) - 1) // self.block_size)
        self._touch(chain)
        return [self.blocks[key].row for key in chain]

    def insert(self, tokens: Sequence[int]) -> tuple[int, list[int]]:
        """Cache every full block of ``tokens``; returns (first new block, the rows to fill for the new ones).

        Blocks already cached are only touched. New blocks take free rows, then
        those of least recently used blocks outside this prompt's chain; when
        none is left, or at a hash collision with another prefix's block, the
        rest of the prompt is not cached. Cost: O(len(tokens)).
        """
        keys = block_keys(tokens, self.block_size)
        chain = self._match(tokens, keys, len(keys))
        first, b = len(chain), self.block_size
        self._touch(chain)  # the chain is now the most recent: eviction below takes blocks outside it
        room = self.capacity - len(chain)  # free rows and the rows of blocks outside the chain
        new = list(itertools.takewhile(lambda k: k not in self.blocks, keys[first:first + room]))
        rows = [self._free_row() for _ in new]
        for i, (key, row) in enumerate(zip(new, rows, strict=True), start=first):
            parent = keys[i - 1] if i else ROOT
            self.blocks[key] = _Block(parent, tuple(tokens[i * b:(i + 1) * b]), row)
            if parent != ROOT:
                self.blocks[parent].children.add(key)
        self._touch(chain + new)
        return first, rows

    def _free_row(self) -> int:
        """A row for a new block: a freed or never used one, else the least recently used block's. Cost: O(1)."""
        if self.free_rows:
            return self.free_rows.pop()
        if self.next_row < self.capacity:
            self.next_row += 1
            return self.next_row - 1
        return self._evict()

    def _evict(self) -> int:
        """Drop the least recently used block (a leaf, see the module docstring); returns its row. Cost: O(1)."""
        key, block = self.blocks.popitem(last=False)
        assert not block.children, "the LRU block has a cached child"
        if block.parent != ROOT:
            self.blocks[block.parent].children.discard(key)
        return block.row

    def discard(self, row: int) -> None:
        """Forget the block at ``row`` and its descendants (their rows become free). Cost: O(cached blocks)."""
        key = next((k for k, block in self.blocks.items() if block.row == row), None)
        if key is None:
            return
        parent = self.blocks[key].parent
        if parent in self.blocks:
            self.blocks[parent].children.discard(key)
        stack = [key]
        while stack:
            block = self.blocks.pop(stack.pop())
            self.free_rows.append(block.row)
            stack.extend(block.children)
