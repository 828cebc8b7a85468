import pytest
import torch
import torch.distributed as dist

from effdl.distributed import RankFailure, spawn


def _all_to_all(rank: int, n: int):
    world = dist.get_world_size()
    send = torch.arange(world * n, dtype=torch.float32) + 100 * rank  # chunk j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return recv.tolist()


def _raise_on_rank_one(rank: int):
    if rank == 1:
        raise KeyError("rank one is broken")
    dist.barrier()  # rank 0 blocks here forever unless spawn stops it
    return rank


def _sleep_forever(rank: int):
    import time

    time.sleep(3600)


def _die(rank: int):
    import os

    os._exit(7 if rank == 0 else 0)


def _die_while_peer_waits(rank: int):
    import os

    if rank == 0:
        os._exit(7)
    dist.all_reduce(torch.ones(1))  # fails at once: its peer's connection is gone


def test_two_rank_all_to_all_matches_reference():
    n = 3
    results = spawn(_all_to_all, 2, n)
    # Reference: rank r receives chunk r of every rank's send buffer, in rank order.
    sends = [torch.arange(2 * n, dtype=torch.float32) + 100 * r for r in range(2)]
    expected = [torch.cat([s[r * n:(r + 1) * n] for s in sends]).tolist() for r in range(2)]
    assert results == expected


def test_rank_exception_is_reraised_not_hung():
    with pytest.raises(KeyError, match="rank one is broken") as info:
        spawn(_raise_on_rank_one, 2, timeout_s=60)
    assert isinstance(info.value.__cause__, RankFailure)
    assert "rank 1 raised" in str(info.value.__cause__)


def test_timeout_and_dead_rank_are_reported():
    with pytest.raises(RankFailure, match=r"did not finish within 3s"):
        spawn(_sleep_forever, 2, timeout_s=3)
    with pytest.raises(RankFailure, match="rank 0 died with exit code 7"):
        spawn(_die, 2, timeout_s=60)


def test_a_dead_rank_is_reported_not_its_peers_broken_connection():
    for _ in range(3):  # the peer's report can beat the exit code to the parent
        with pytest.raises(RankFailure, match="rank 0 died with exit code 7"):
            spawn(_die_while_peer_waits, 2, timeout_s=60)
