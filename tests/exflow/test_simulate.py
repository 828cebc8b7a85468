"""The expert-parallel communication simulator against brute-force loops and hand-computed costs."""

import re

import numpy as np
import pytest

from effdl.errors import EffdlError
from effdl.exflow.simulate import Topology, all_to_all_seconds, plan_table, simulate, traffic_matrices


def _balanced_placement(rng, n_layers: int, n_experts: int, n_gpus: int) -> np.ndarray:
    """(L, E) random placement with E / G experts per rank per layer."""
    return np.stack([rng.permutation(np.repeat(np.arange(n_gpus), n_experts // n_gpus)) for _ in range(n_layers)])


def _random_trace(rng, n_tokens: int, n_layers: int, n_experts: int, k: int) -> np.ndarray:
    """(N, L, k) distinct expert ids per token and layer."""
    return np.stack([[rng.choice(n_experts, k, replace=False) for _ in range(n_layers)] for _ in range(n_tokens)])


def _brute_force(experts, gpu_of, mode: str, n_gpus: int) -> dict[str, np.ndarray]:
    n_tokens, n_layers, _ = experts.shape
    out = {kind: np.zeros((n_layers, n_gpus, n_gpus), dtype=np.int64) for kind in ("dispatch", "combine")}
    for n in range(n_tokens):
        at = n % n_gpus
        for layer in range(n_layers):
            ranks = [int(gpu_of[layer, e]) for e in experts[n, layer]]
            if mode == "standard":
                for r in ranks:
                    out["dispatch"][layer, n % n_gpus, r] += 1
                    out["combine"][layer, r, n % n_gpus] += 1
            else:
                for r in ranks:
                    out["dispatch"][layer, at, r] += 1
                for r in ranks[1:]:
                    out["combine"][layer, r, ranks[0]] += 1
                at = ranks[0]
    return out


@pytest.mark.parametrize("mode", ["standard", "coherent"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("n_gpus", [2, 4])
def test_traffic_matches_brute_force(mode, k, n_gpus):
    rng = np.random.default_rng(n_gpus * 10 + k)
    experts = _random_trace(rng, n_tokens=37, n_layers=3, n_experts=8, k=k)
    gpu_of = _balanced_placement(rng, 3, 8, n_gpus)
    got = traffic_matrices(experts, gpu_of, mode, n_gpus)
    want = _brute_force(experts, gpu_of, mode, n_gpus)
    assert set(got) == {"dispatch", "combine"}
    for kind in want:
        np.testing.assert_array_equal(got[kind], want[kind], err_msg=kind)
    if mode == "coherent" and k == 1:
        assert not got["combine"].any()


def _home_aligned(n_tokens: int, n_layers: int, n_gpus: int, n_experts: int, k: int, shift: int) -> tuple:
    """gpu_of[l, e] = e % G, and every expert of token n on rank (n + shift) % G at every layer."""
    rng = np.random.default_rng(0)
    gpu_of = np.tile(np.arange(n_experts) % n_gpus, (n_layers, 1))
    rank = (np.arange(n_tokens) + shift) % n_gpus  # (N,)
    slot = np.stack([[rng.choice(n_experts // n_gpus, k, replace=False) for _ in range(n_layers)] for _ in rank])
    return rank[:, None, None] + n_gpus * slot, gpu_of  # (N, L, k), (L, E)


@pytest.mark.parametrize("k", [1, 2])
def test_perfect_placement_sends_nothing_cross_rank(k):
    experts, gpu_of = _home_aligned(n_tokens=40, n_layers=3, n_gpus=4, n_experts=8, k=k, shift=0)
    topo = Topology(n_gpus=4, gpus_per_node=2)
    for mode in ("standard", "coherent"):
        result = simulate(experts, gpu_of, mode, topo, bytes_per_token=4096)
        np.testing.assert_array_equal(result.cross_rank_copies, 0)
        np.testing.assert_array_equal(result.seconds_per_layer, 0.0)
    combine = traffic_matrices(experts, gpu_of, "coherent", 4)["combine"]
    assert combine.sum() == 40 * 3 * (k - 1)  # secondary outputs all land on the primary's own rank
    assert not (combine * (1 - np.eye(4, dtype=int))).any()


def test_experts_off_home_rank():
    """Experts one rank past home at every layer: standard pays dispatch + combine every layer, coherent only once."""
    n_tokens, n_gpus = 40, 4
    experts, gpu_of = _home_aligned(n_tokens, n_layers=3, n_gpus=n_gpus, n_experts=8, k=1, shift=1)
    topo = Topology(n_gpus=n_gpus, gpus_per_node=2)
    standard = simulate(experts, gpu_of, "standard", topo, bytes_per_token=1024)
    coherent = simulate(experts, gpu_of, "coherent", topo, bytes_per_token=1024)
    np.testing.assert_array_equal(standard.cross_rank_copies, [2 * n_tokens] * 3)
    np.testing.assert_array_equal(coherent.cross_rank_copies, [n_tokens, 0, 0])
    # home -> home + 1 leaves the node for homes 1 and 3 (half the tokens)
    np.testing.assert_array_equal(standard.cross_node_copies, [n_tokens] * 3)
    np.testing.assert_array_equal(coherent.cross_node_copies, [n_tokens // 2, 0, 0])
    assert coherent.total_seconds < standard.total_seconds / 2


def test_all_to_all_seconds_two_nodes():
    topo = Topology(
        n_gpus=4, gpus_per_node=2, intra_gbps=100.0, inter_gbps=10.0, intra_latency_us=2.0, inter_latency_us=10.0
    )
    send_bound = np.zeros((4, 4))
    send_bound[0, 0] = 9999  # to itself: free
    send_bound[0, 1] = 1000  # intra: 2 us + 1e6 B / 100 GB/s = 12 us
    send_bound[0, 2] = 500  # inter: 10 us + 5e5 B / 10 GB/s = 60 us
    assert all_to_all_seconds(send_bound, 1000.0, topo) == pytest.approx(72e-6)
    receive_bound = np.zeros((4, 4))
    receive_bound[1:, 0] = 100  # into rank 0: 2 + 1 us from rank 1, 10 + 10 us from ranks 2 and 3
    assert all_to_all_seconds(receive_bound, 1000.0, topo) == pytest.approx(43e-6)
    assert all_to_all_seconds(np.zeros((4, 4)), 1000.0, topo) == 0.0
    assert all_to_all_seconds(np.array([[5]]), 1000.0, Topology(n_gpus=1)) == 0.0


def test_node_of_and_one_partial_node():
    assert Topology(n_gpus=8).node_of(5) == 1
    np.testing.assert_array_equal(Topology(n_gpus=2).node_of(np.arange(2)), [0, 0])


def test_collectives_per_layer_and_allgather():
    rng = np.random.default_rng(1)
    gpu_of = _balanced_placement(rng, 2, 4, 2)
    topo = Topology(n_gpus=2, intra_latency_us=1.0)
    counts = {}
    for k in (1, 2):
        experts = _random_trace(rng, n_tokens=6, n_layers=2, n_experts=4, k=k)
        for mode in ("standard", "coherent"):
            result = simulate(experts, gpu_of, mode, topo, bytes_per_token=16, kv_bytes_per_token=2e5)
            counts[mode, k] = result.collectives_per_layer
            # 3 tokens per home rank to the other rank: 1 us + 6e5 B / 200 GB/s = 4 us
            assert result.allgather_seconds == (pytest.approx(4e-6) if mode == "coherent" else 0.0)
            assert result.total_seconds == pytest.approx(result.seconds_per_layer.sum() + result.allgather_seconds)
    assert counts == {("standard", 1): 2, ("coherent", 1): 1, ("standard", 2): 2, ("coherent", 2): 2}


def test_plan_table():
    n_tokens, n_gpus = 64, 4
    experts, aligned = _home_aligned(n_tokens, n_layers=4, n_gpus=n_gpus, n_experts=8, k=1, shift=1)
    rng = np.random.default_rng(2)
    placements = {"round_robin": _balanced_placement(rng, 4, 8, n_gpus), "aligned": aligned}
    rows = plan_table(experts, placements, Topology(n_gpus=n_gpus, gpus_per_node=2), bytes_per_token=8192)
    assert [(r["label"], r["mode"], r["a2a_per_layer"]) for r in rows] == [
        ("round_robin", "standard", 2),
        ("round_robin", "coherent", 1),
        ("aligned", "coherent", 1),
    ]
    assert rows[0]["speedup"] == 1.0
    assert rows[2]["cross_rank_per_token_layer"] == pytest.approx(1 / 4)  # layer 0 only
    assert rows[2]["speedup"] > rows[1]["speedup"] > 1.0


@pytest.mark.parametrize(
    ("experts", "gpu_of", "mode", "fragment"),
    [
        (np.zeros((4, 2), dtype=int), np.zeros((2, 4), dtype=int), "standard", "experts must be 3-D"),
        (np.zeros((4, 2, 1), dtype=int), np.zeros((3, 4), dtype=int), "standard", "L = 2 as in experts"),
        (np.zeros((4, 2, 1), dtype=int), np.zeros(4, dtype=int), "standard", "gpu_of must be (L, E)"),
        (np.full((4, 2, 1), 4), np.zeros((2, 4), dtype=int), "standard", "expert id 4 (token 0, layer 0"),
        (np.full((4, 2, 1), -1), np.zeros((2, 4), dtype=int), "coherent", "out of range [0, 4)"),
        (np.zeros((4, 2, 1), dtype=int), np.full((2, 4), 2), "coherent", "on rank 2, but there are 2 ranks"),
        (np.zeros((4, 2, 1), dtype=int), np.zeros((2, 4), dtype=int), "tutel", "unknown mode 'tutel'"),
        (np.zeros((4, 2, 1)), np.zeros((2, 4), dtype=int), "standard", "integer expert ids"),
    ],
)
def test_bad_inputs(experts, gpu_of, mode, fragment):
    with pytest.raises(EffdlError, match=re.escape(fragment)):
        simulate(experts, gpu_of, mode, Topology(n_gpus=2), bytes_per_token=1)


def test_bad_topology_and_sizes():
    with pytest.raises(EffdlError, match="not a whole number of nodes of 4"):
        Topology(n_gpus=6)
    with pytest.raises(EffdlError, match="inter_gbps must be positive"):
        Topology(n_gpus=4, inter_gbps=0)
    with pytest.raises(EffdlError, match="n_gpus must be a positive integer"):
        Topology(n_gpus=0)
    with pytest.raises(EffdlError, match=r"traffic must be \(G, G\) with G = 4"):
        all_to_all_seconds(np.zeros((2, 2)), 1.0, Topology(n_gpus=4))
    with pytest.raises(EffdlError, match="bytes_per_token must be non-negative"):
        simulate(np.zeros((2, 1, 1), dtype=int), np.zeros((1, 2), dtype=int), "standard", Topology(n_gpus=2), -1)
    with pytest.raises(EffdlError, match="at least one placement"):
        plan_table(np.zeros((2, 1, 1), dtype=int), {}, Topology(n_gpus=2), 1)
