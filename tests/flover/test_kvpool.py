"""plan_shuffle against a brute-force search over slot states, and the pool's bookkeeping."""

import itertools
import random
from collections import deque

import pytest
import torch

from effdl.core.config import ModelConfig
from effdl.flover.kvpool import KVPool, SlotTable, plan_shuffle


def _contiguous(live) -> bool:
    owned = [i for i, x in enumerate(live) if x]
    return not owned or owned[-1] - owned[0] + 1 == len(owned)


def _fewest_moves(n: int) -> dict[tuple[bool, ...], int]:
    """Fewest single moves (a live slot to a free one) from every state to a contiguous one: BFS from the goals."""
    dist = {}
    for k in range(n + 1):
        states = [tuple(i in c for i in range(n)) for c in itertools.combinations(range(n), k)]
        frontier = deque(s for s in states if _contiguous(s))
        dist.update({s: 0 for s in frontier})
        while frontier:
            s = frontier.popleft()
            for a, b in itertools.permutations(range(n), 2):
                if s[a] and not s[b]:  # moves are reversible, so search back from the goals
                    t = list(s)
                    t[a], t[b] = False, True
                    t = tuple(t)
                    if t not in dist:
                        dist[t] = dist[s] + 1
                        frontier.append(t)
    return dist


def _apply(live, moves) -> list[bool]:
    live = list(live)
    for src, dst in moves:
        assert live[src] and not live[dst], (live, src, dst)
        live[src], live[dst] = False, True
    return live


@pytest.mark.parametrize("n", range(1, 11))
def test_plan_shuffle_is_minimal_on_every_pattern(n):
    for live, fewest in _fewest_moves(n).items():
        moves = plan_shuffle(live)
        after = _apply(live, moves)
        assert _contiguous(after) and sum(after) == sum(live)
        assert len(moves) == fewest, (live, moves)


def test_plan_shuffle_on_large_random_patterns():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(11, 96)
        live = [rng.random() < rng.random() for _ in range(n)]
        k = sum(live)
        best = max((sum(live[s:s + k]) for s in range(n - k + 1)), default=0)
        moves = plan_shuffle(live)
        assert _contiguous(_apply(live, moves))
        assert len(moves) == k - best


def test_slot_table_allocates_next_to_the_live_span():
    table = SlotTable(8)
    assert [table.allocate(f"r{i}") for i in range(3)] == [0, 1, 2]
    table.release(0)
    assert table.allocate("r3") == 0  # the hole inside the span costs nothing
    table.release(0), table.release(1)
    assert table.allocate("r4") == 1  # adjacent to slot 2, not the far end
    assert table.n_free == 6
    table.move(2, 5)
    assert table.owner[5] == "r2" and table.owner[2] is None
    with pytest.raises(AssertionError):
        table.move(2, 5)


def test_pool_move_copies_every_layer():
    cfg = ModelConfig.preset("tiny")
    pool = KVPool(cfg, 4, 16)
    pool.cache.k[:, 3].normal_()
    pool.cache.v[:, 3].normal_()
    pool.move(3, 1, 10)
    torch.testing.assert_close(pool.cache.k[:, 1, :, :10], pool.cache.k[:, 3, :, :10], rtol=0, atol=0)
    torch.testing.assert_close(pool.cache.v[:, 1, :, :10], pool.cache.v[:, 3, :, :10], rtol=0, atol=0)
    assert pool.cache.k[:, 1, :, 10:].abs().sum() == 0
