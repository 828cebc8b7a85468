import itertools
import json
import time

import numpy as np
import pytest

from effdl.errors import EffdlError
from effdl.exflow.placement import METHODS, Placement, cross_gpu_fraction, round_robin, solve


def random_counts(seed: int, n_layers: int, n_experts: int) -> np.ndarray:
    """Unstructured integer counts (L-1, E, E)."""
    return np.random.default_rng(seed).integers(0, 10, (n_layers - 1, n_experts, n_experts)).astype(float)


def affinity_counts(seed: int, n_layers: int, n_experts: int, noise: float = 0.3) -> np.ndarray:
    """Each expert sends most tokens to one expert of the next layer (a random permutation), the rest at random."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 10, (n_layers - 1, n_experts, n_experts)).astype(float)
    for layer in range(n_layers - 1):
        counts[layer, np.arange(n_experts), rng.permutation(n_experts)] += 4.5 * n_experts * (1 - noise) / noise
    return counts


def brute_force_cross(counts: np.ndarray, n_gpus: int) -> float:
    """Exact optimum by enumerating every balanced placement of every layer (max over the chain, layer by layer)."""
    n_experts, cap = counts.shape[1], counts.shape[1] // n_gpus
    layouts = np.array(
        [p for p in itertools.product(range(n_gpus), repeat=n_experts) if all(p.count(g) == cap for g in range(n_gpus))]
    )  # (K, E)
    same = layouts[:, None, :, None] == layouts[None, :, None, :]  # (K, K, E, E): pair (i, j) shares a GPU
    best = np.zeros(len(layouts))  # best stay of layers l+1.. given layer l+1's layout
    for layer in reversed(range(counts.shape[0])):
        best = (np.einsum("abij,ij->ab", same, counts[layer]) + best).max(axis=1)
    return 1 - best.max() / counts.sum()


def assert_balanced(p: Placement, n_layers: int, n_experts: int, n_gpus: int) -> None:
    assert p.gpu_of.shape == (n_layers, n_experts) and p.gpu_of.dtype == np.int64
    assert (p.n_layers, p.n_experts, p.n_gpus) == (n_layers, n_experts, n_gpus)
    for layer in p.gpu_of:
        assert np.bincount(layer, minlength=n_gpus).tolist() == [n_experts // n_gpus] * n_gpus


def test_cross_gpu_fraction_by_hand():
    counts = np.array([[[3.0, 1.0], [2.0, 4.0]]])  # 10 transitions between 2 layers of 2 experts
    assert cross_gpu_fraction(counts, [[0, 1], [0, 1]]) == pytest.approx(0.3)  # 1 + 2 cross
    assert cross_gpu_fraction(counts, [[0, 1], [1, 0]]) == pytest.approx(0.7)  # 3 + 4 cross
    assert cross_gpu_fraction(np.zeros((2, 2, 2)), round_robin(3, 2, 2)) == 0.0
    with pytest.raises(EffdlError, match=r"gpu_of of shape \(2, 3\) does not match counts of shape \(1, 2, 2\)"):
        cross_gpu_fraction(counts, np.zeros((2, 3), dtype=int))


def test_round_robin():
    assert round_robin(2, 6, 3).tolist() == [[0, 1, 2, 0, 1, 2]] * 2


@pytest.mark.parametrize(("shape", "seed"), [((3, 4, 2), s) for s in range(5)] + [((3, 6, 3), 0), ((4, 6, 2), 1)])
def test_ilp_reaches_brute_force_optimum(shape, seed):
    n_layers, n_experts, n_gpus = shape
    counts = random_counts(seed, n_layers, n_experts)
    p = solve(counts, n_gpus, "ilp", time_limit_s=20)
    assert p.objective == pytest.approx(brute_force_cross(counts, n_gpus), abs=1e-9)
    assert p.gap == 0.0 and p.method == "ilp"
    assert p.objective <= solve(counts, n_gpus, "staged").objective + 1e-12


@pytest.mark.parametrize(("n_layers", "n_experts", "n_gpus"), [(2, 4, 2), (4, 8, 4), (5, 12, 3), (3, 16, 8), (3, 6, 1)])
def test_no_method_violates_capacity(n_layers, n_experts, n_gpus):
    for seed, make in enumerate([random_counts, affinity_counts]):
        counts = make(seed, n_layers, n_experts)
        for method in METHODS:
            p = solve(counts, n_gpus, method, time_limit_s=0.5)
            assert_balanced(p, n_layers, n_experts, n_gpus)
            assert p.objective == pytest.approx(cross_gpu_fraction(counts, p.gpu_of))
            assert (p.gap is None) == (method != "ilp") and p.solve_s > 0


@pytest.mark.parametrize(
    ("n_layers", "n_experts", "n_gpus", "seed"),
    [(3, 4, 2, 0), (4, 8, 2, 1), (4, 8, 4, 2), (3, 12, 3, 3), (5, 16, 4, 4)],
)
def test_ilp_beats_staged_beats_round_robin(n_layers, n_experts, n_gpus, seed):
    counts = affinity_counts(seed, n_layers, n_experts)
    rr, staged, ilp = (solve(counts, n_gpus, m, time_limit_s=1).objective for m in ("round_robin", "staged", "ilp"))
    assert ilp <= staged + 1e-12
    assert staged < 0.6 * rr  # the affinity is real, so keeping it beats round robin clearly


def test_trivial_cases():
    counts = random_counts(0, 3, 4)
    one = solve(counts, 1)
    assert one.gpu_of.tolist() == [[0] * 4] * 3 and one.objective == 0.0 and one.gap == 0.0
    empty = solve(np.zeros((2, 4, 4)), 2)
    assert empty.objective == 0.0 and empty.gap == 0.0
    assert_balanced(solve(np.zeros((0, 4, 4)), 2), 1, 4, 2)  # a single MoE layer: nothing to optimise


def test_time_limit_returns_a_valid_placement_no_worse_than_staged():
    counts = affinity_counts(5, 6, 32)
    staged = solve(counts, 4, "staged")
    for limit in (1.0, 1e-3):
        start = time.perf_counter()
        p = solve(counts, 4, "ilp", time_limit_s=limit)
        assert time.perf_counter() - start < 10
        assert_balanced(p, 6, 32, 4)
        assert p.objective <= staged.objective + 1e-12
        assert p.gap is None or (isinstance(p.gap, float) and p.gap >= 0)


def test_save_load_round_trip(tmp_path):
    p = solve(random_counts(1, 3, 4), 2, model="moe-tiny@abc123")
    path = p.save(tmp_path / "sub" / "placement.json")
    text = path.read_text()
    assert json.loads(text)["gpu_of"] == p.gpu_of.tolist() and text.count("\n") > p.n_layers  # a row per line
    q = Placement.load(path)
    assert np.array_equal(q.gpu_of, p.gpu_of) and q.gpu_of.dtype == np.int64
    assert (q.method, q.objective, q.gap, q.solve_s, q.model, q.n_gpus) == (
        p.method,
        p.objective,
        p.gap,
        p.solve_s,
        p.model,
        p.n_gpus,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"counts": np.zeros((4, 4))}, r"3-D array \(L-1, E, E\), got shape \(4, 4\)"),
        ({"counts": np.zeros((2, 4, 3))}, r"square last two dims.*\(2, 4, 3\)"),
        ({"counts": -np.ones((2, 4, 4))}, r"finite and >= 0, got -1.0 at \[0, 0, 0\]"),
        ({"counts": np.full((2, 4, 4), np.nan)}, r"finite and >= 0, got nan"),
        ({"n_gpus": 0}, "n_gpus must be an integer >= 1, got 0"),
        ({"counts": np.ones((2, 16, 16)), "n_gpus": 3}, "^16 experts cannot be split evenly over 3 GPUs$"),
        ({"method": "greedy"}, "unknown method 'greedy'; valid: ilp, staged, round_robin"),
        ({"time_limit_s": 0}, "time_limit_s must be > 0, got 0"),
    ],
)
def test_bad_inputs(kwargs, message):
    args = {"counts": np.ones((2, 4, 4)), "n_gpus": 2, **kwargs}
    with pytest.raises(EffdlError, match=message):
        solve(**args)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object, got list"),
        ({"gpu_of": [[0, 1]], "n_gpus": 2}, r"lacks the keys \['method', 'objective'\]"),
        ({"extra": 1}, r"unknown keys \['extra'\]"),
        ({"gpu_of": [[0, 1], [0]]}, r"not rectangular, row lengths \[2, 1\]"),
        ({"gpu_of": [[0, 1], [0, 0]]}, "unbalanced: layer 1 puts 2 experts on GPU 0, expected 1"),
        ({"gpu_of": [[0, 2], [0, 1]]}, r"GPU ids 0..2, outside 0..1"),
        ({"gpu_of": [[0, 1.5], [0, 1]]}, "entries must be integers"),
        ({"gpu_of": [[0, 1, 0], [0, 1, 1]]}, "3 experts cannot be split evenly over 2 GPUs"),
        ({"method": "magic"}, "unknown method 'magic'"),
        ({"gap": -1.0}, "gap must be a number >= 0"),
    ],
)
def test_load_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "placement.json"
    good = {"gpu_of": [[0, 1], [1, 0]], "n_gpus": 2, "method": "ilp", "objective": 0.5}
    if isinstance(content, dict):
        path.write_text(json.dumps({**good, **content} if "n_gpus" not in content else content))
    elif content is not None:
        path.write_text(content)
    with pytest.raises(EffdlError, match=message) as err:
        Placement.load(path)
    assert str(path) in str(err.value)
