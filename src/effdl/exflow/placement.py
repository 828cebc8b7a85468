"""ExFlow expert placement: put experts of consecutive layers that share tokens on the same GPU.

Paper: Yao et al., "Exploiting Inter-Layer Expert Affinity for Accelerating Mixture-of-Experts Model
Inference" (IPDPS 2024, arXiv 2401.08383). Dimensions: L layers, E experts per layer, G GPUs,
cap = E / G experts per GPU per layer, P = number of expert pairs (l, i, j) with counts > 0.

Input: ``counts[l, i, j]`` (L-1, E, E), the (weighted) number of tokens at expert i of layer l and
expert j of layer l+1. A placement ``gpu_of[l, e]`` (L, E) puts every GPU in charge of exactly cap
experts of every layer. A token crosses GPUs between layers l and l+1 when gpu_of[l, i] != gpu_of[l+1, j];
we minimise the crossing share (``cross_gpu_fraction``), i.e. maximise the tokens that stay.

Integer program (``method="ilp"``, scipy.optimize.milp with HiGHS):
    x[l, e, g] in {0, 1}      expert e of layer l sits on GPU g              L E G binaries
    z[l, i, j, g] in [0, 1]   pair (i, j) of layers (l, l+1) stays on GPU g   P G, only for counts > 0
    maximise sum counts[l, i, j] z[l, i, j, g]
    z <= x[l, i, g],  z <= x[l+1, j, g]               (z = x AND x, since z is maximised)
    sum_g x[l, e, g] = 1,  sum_e x[l, e, g] = cap     (each expert once; balanced GPUs)
  Cuts: the LP relaxation alone is weak (x = 1/G everywhere lets every z be 1/G). Layer l+1 has only cap
  experts on GPU g, so expert i shares GPU g with at most cap successors:
    sum_j z[l, i, j, g] <= cap x[l, i, g],   sum_i z[l, i, j, g] <= cap x[l+1, j, g].
  Symmetry: relabelling the GPUs with ONE permutation for all layers maps solutions to solutions of
  equal cost (relabelling a single layer does not: transitions couple the layers). We keep one labelling
  per class by numbering GPUs in the order of their first expert in layer 0:
    x[0, e, g] <= sum_{e' < e} x[0, e', g-1]  (g >= 1), which implies x[0, e, g] = 0 for g > e.
  Cost: about 2 P G rows and 1 + 2G nonzeros per z; branch and bound is exponential in the worst case,
  so the solve stops at ``time_limit_s``. scipy's milp takes no warm start, so the staged heuristic is
  always run too and the better placement returned. ``gap`` measures it against the better of two lower
  bounds on the crossing tokens: HiGHS's dual bound, and a bound from the cuts -- at most the cap largest
  entries of each row (and column) of counts[l] can stay -- which is all we have when HiGHS stops before
  its root LP is solved (often the case for E >= 32).
Staged (``method="staged"``): with the neighbouring layers fixed, the best placement of one layer is a
  balanced assignment -- expert e on GPU g gains the tokens it exchanges with neighbours on g -- solved
  exactly by ``linear_sum_assignment`` on the (E, E) matrix of each GPU repeated cap times. From an anchor
  layer in round robin, the other layers are placed in turn given the neighbour placed before them, then
  sweeps re-place every layer given both neighbours until the objective stops improving; the best of the
  L anchors is kept. Cost O(L sweeps L E^3), well under a second at E=64, L=6.
Round robin: gpu_of[l, e] = e % G, expert parallelism that ignores affinity. Cost O(L E).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp

from effdl.errors import EffdlError

METHODS = ("ilp", "staged", "round_robin")
MAX_SWEEPS = 20  # coordinate sweeps of the staged method; it usually converges in 2-5


@dataclass
class Placement:
    """GPU of every expert, ``gpu_of[l, e]`` (L, E) int64, each GPU holding E / n_gpus experts per layer.

    ``objective`` is ``cross_gpu_fraction`` on the counts it was solved for; ``gap`` (ilp only) is the relative
    gap in cross-GPU counts between this placement and the solver's lower bound (0.0 = proven optimal, None =
    no bound); ``model`` is a free-text fingerprint of the model the counts came from.
    """

    gpu_of: np.ndarray  # (L, E) int64
    n_gpus: int
    method: str
    objective: float
    gap: float | None = None
    solve_s: float = 0.0
    model: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise EffdlError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        for name in ("objective", "solve_s") + (("gap",) if self.gap is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise EffdlError(f"{name} must be a number >= 0, got {value!r}")
        if not isinstance(self.model, str):
            raise EffdlError(f"model must be a string, got {self.model!r}")
        self.gpu_of = _check_placement(self.gpu_of, self.n_gpus)

    @property
    def n_layers(self) -> int:
        return self.gpu_of.shape[0]

    @property
    def n_experts(self) -> int:
        return self.gpu_of.shape[1]

    def save(self, path: str | Path) -> Path:
        """Write the placement as JSON, one line per layer of ``gpu_of``; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        head = json.dumps({k: v for k, v in asdict(self).items() if k != "gpu_of"}, indent=2)
        rows = ",\n".join("    " + json.dumps(row) for row in self.gpu_of.tolist())
        path.write_text(f'{head[:-2]},\n  "gpu_of": [\n{rows}\n  ]\n}}\n')
        return path

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        """Read a placement written by ``save``, checking its keys, its shape and the balance of every layer."""
        path = Path(path)
        if not path.is_file():
            raise EffdlError(f"placement file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EffdlError(f"placement file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise EffdlError(f"placement file {path} must hold a JSON object, got {type(data).__name__}")
        required, known = {"gpu_of", "n_gpus", "method", "objective"}, set(cls.__dataclass_fields__)
        if missing := sorted(required - set(data)):
            raise EffdlError(f"placement file {path} lacks the keys {missing}")
        if unknown := sorted(set(data) - known):
            raise EffdlError(f"placement file {path} has unknown keys {unknown}; valid: {sorted(known)}")
        rows = data["gpu_of"]
        if not (isinstance(rows, list) and rows and all(isinstance(r, list) and r for r in rows)):
            raise EffdlError(f"placement file {path}: gpu_of must be a non-empty list of non-empty lists")
        if len({len(r) for r in rows}) > 1:
            raise EffdlError(f"placement file {path}: gpu_of is not rectangular, row lengths {[len(r) for r in rows]}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for r in rows for v in r):
            raise EffdlError(f"placement file {path}: gpu_of entries must be integers")
        try:
            return cls(**{**data, "gpu_of": np.array(rows, dtype=np.int64)})
        except EffdlError as e:
            raise EffdlError(f"placement file {path}: {e}") from None


def _check_split(n_experts: int, n_gpus: int) -> None:
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, (int, np.integer)) or n_gpus < 1:
        raise EffdlError(f"n_gpus must be an integer >= 1, got {n_gpus!r}")
    if n_experts % n_gpus:
        raise EffdlError(f"{n_experts} experts cannot be split evenly over {n_gpus} GPUs")


def _check_placement(gpu_of: np.ndarray, n_gpus: int) -> np.ndarray:
    """gpu_of as (L, E) int64, after checking that every GPU holds E / n_gpus experts of every layer."""
    gpu_of = np.asarray(gpu_of)
    if gpu_of.ndim != 2 or gpu_of.size == 0 or not np.issubdtype(gpu_of.dtype, np.integer):
        raise EffdlError(f"gpu_of must be a non-empty (L, E) integer array, got {gpu_of.dtype} of shape {gpu_of.shape}")
    _check_split(gpu_of.shape[1], n_gpus)
    if gpu_of.min() < 0 or gpu_of.max() >= n_gpus:
        raise EffdlError(f"gpu_of holds GPU ids {gpu_of.min()}..{gpu_of.max()}, outside 0..{n_gpus - 1}")
    load = (gpu_of[:, :, None] == np.arange(n_gpus)).sum(axis=1)  # (L, G) experts per GPU per layer
    cap = gpu_of.shape[1] // n_gpus
    if (load != cap).any():
        layer, gpu = np.argwhere(load != cap)[0]
        raise EffdlError(f"unbalanced: layer {layer} puts {load[layer, gpu]} experts on GPU {gpu}, expected {cap}")
    return gpu_of.astype(np.int64)


def _check_counts(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 3:
        raise EffdlError(f"counts must be a 3-D array (L-1, E, E), got shape {counts.shape}")
    if counts.shape[1] != counts.shape[2] or counts.shape[1] == 0:
        raise EffdlError(f"counts must be (L-1, E, E) with E >= 1 (square last two dims), got shape {counts.shape}")
    bad = ~np.isfinite(counts) | (counts < 0)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise EffdlError(f"counts must be finite and >= 0, got {counts[where]} at {list(where)}")
    return counts


def round_robin(n_layers: int, n_experts: int, n_gpus: int) -> np.ndarray:
    """gpu_of[l, e] = e % n_gpus: (n_layers, n_experts) int64, the affinity-blind expert-parallel layout. O(L E)."""
    _check_split(n_experts, n_gpus)
    return np.tile(np.arange(n_experts, dtype=np.int64) % n_gpus, (n_layers, 1))


def _stay(counts: np.ndarray, gpu_of: np.ndarray) -> float:
    """Counted transitions whose two experts share a GPU. O(L E^2)."""
    same = gpu_of[:-1, :, None] == gpu_of[1:, None, :]  # (L-1, E, E)
    return float(counts[same].sum())


def cross_gpu_fraction(counts: np.ndarray, gpu_of: np.ndarray) -> float:
    """Share of all counted transitions whose two experts sit on different GPUs; 0.0 if counts sum to 0. O(L E^2)."""
    counts, gpu_of = _check_counts(counts), np.asarray(gpu_of)
    if gpu_of.shape != (counts.shape[0] + 1, counts.shape[1]):
        raise EffdlError(f"gpu_of of shape {gpu_of.shape} does not match counts of shape {counts.shape}")
    total = float(counts.sum())
    return 0.0 if total == 0 else max(0.0, (total - _stay(counts, gpu_of)) / total)


def _stay_upper_bound(counts: np.ndarray, cap: int) -> float:
    """Most transitions that can stay: each expert shares its GPU with cap experts of each neighbour layer,
    so at most the cap largest entries of every row (and of every column) of counts[l] stay. O(L E^2 log E)."""
    rows = -np.sort(-counts, axis=2)[:, :, :cap].sum(axis=(1, 2))  # (L-1,)
    cols = -np.sort(-counts, axis=1)[:, :cap, :].sum(axis=(1, 2))  # (L-1,)
    return float(np.minimum(rows, cols).sum())


def _balanced_assignment(gain: np.ndarray, n_gpus: int) -> np.ndarray:
    """Exact argmax of sum_e gain[e, gpu[e]] with E / G experts per GPU: gain (E, G) -> gpu (E,). O(E^3)."""
    cap = gain.shape[0] // n_gpus
    _, slot = linear_sum_assignment(np.repeat(gain, cap, axis=1), maximize=True)  # (E, E): GPU g -> cap slots
    return slot // cap


def _layer_gain(counts: np.ndarray, gpu_of: np.ndarray, layer: int, n_gpus: int) -> np.ndarray:
    """gain[e, g] (E, G): tokens that stay if expert e of ``layer`` sits on GPU g, its neighbour layers fixed."""
    onehot = np.eye(n_gpus)  # row g: GPU g as a one-hot (G,)
    gain = np.zeros((counts.shape[1], n_gpus))
    if layer > 0:
        gain += counts[layer - 1].T @ onehot[gpu_of[layer - 1]]  # (E, E)^T @ (E, G): tokens arriving from each GPU
    if layer < len(gpu_of) - 1:
        gain += counts[layer] @ onehot[gpu_of[layer + 1]]  # (E, E) @ (E, G): tokens leaving to each GPU
    return gain


def _staged(counts: np.ndarray, n_gpus: int) -> np.ndarray:
    """Best of L starts: from each anchor layer (round robin), place the layers after it and then the layers
    before it by balanced assignments given the layer just placed, then sweep given both neighbours until the
    objective stops improving. O(L sweeps L E^3)."""
    n_layers = counts.shape[0] + 1
    best, best_stay = None, -1.0
    for anchor in range(n_layers):
        gpu_of = _sweep(counts, _chain_from(counts, anchor, n_gpus), n_gpus)
        stay = _stay(counts, gpu_of)
        if stay > best_stay:
            best, best_stay = gpu_of, stay
    return best


def _chain_from(counts: np.ndarray, anchor: int, n_gpus: int) -> np.ndarray:
    """Round robin at ``anchor``; every other layer placed given its already-placed neighbour towards the anchor."""
    n_layers, n_experts = counts.shape[0] + 1, counts.shape[1]
    gpu_of = round_robin(n_layers, n_experts, n_gpus)
    onehot = np.eye(n_gpus)
    for layer in range(anchor + 1, n_layers):  # tokens arriving from the previous layer
        gpu_of[layer] = _balanced_assignment(counts[layer - 1].T @ onehot[gpu_of[layer - 1]], n_gpus)
    for layer in range(anchor - 1, -1, -1):  # tokens leaving to the next layer
        gpu_of[layer] = _balanced_assignment(counts[layer] @ onehot[gpu_of[layer + 1]], n_gpus)
    return gpu_of


def _sweep(counts: np.ndarray, gpu_of: np.ndarray, n_gpus: int) -> np.ndarray:
    """Re-place every layer given both neighbours, sweep after sweep, until the objective stops improving."""
    best, tol = _stay(counts, gpu_of), 1e-12 * float(counts.sum())
    for _ in range(MAX_SWEEPS):  # each step is exact given its neighbours, so the objective never gets worse
        for layer in range(len(gpu_of)):
            gpu_of[layer] = _balanced_assignment(_layer_gain(counts, gpu_of, layer, n_gpus), n_gpus)
        stay = _stay(counts, gpu_of)
        if stay <= best + tol:
            break
        best = stay
    return gpu_of


def _rows(n_var: int, n_rows: int, entries: list, lb: float, ub: float) -> LinearConstraint:
    """lb <= A v <= ub with A (n_rows, n_var) sparse, built from (row, col, value) triples."""
    row = np.concatenate([np.ravel(r) for r, _, _ in entries])
    col = np.concatenate([np.ravel(c) for _, c, _ in entries])
    val = np.concatenate([np.broadcast_to(v, np.shape(r)).ravel() for r, _, v in entries])
    return LinearConstraint(sparse.csr_array((val, (row, col)), shape=(n_rows, n_var)), lb, ub)


def _ilp(counts: np.ndarray, n_gpus: int, time_limit_s: float) -> tuple[np.ndarray | None, float | None, bool]:
    """Solve the integer program of the module docstring: (gpu_of or None, lower bound on cross counts, optimal)."""
    n_trans, n_experts, _ = counts.shape
    n_layers, G, cap = n_trans + 1, n_gpus, n_experts // n_gpus
    n_x = n_layers * n_experts * G
    pl, pi, pj = np.nonzero(counts)  # the P pairs with counts > 0
    n_var = n_x + len(pl) * G
    g = np.arange(G)
    z = n_x + np.arange(len(pl) * G).reshape(-1, G)  # (P, G) ids of z
    x_from, x_to = (pl * n_experts + pi)[:, None] * G + g, ((pl + 1) * n_experts + pj)[:, None] * G + g  # (P, G)
    xs = np.arange(n_x)
    own = xs[: n_trans * n_experts * G]  # ids of x[l, e, g] for l < L-1, also the cut rows (l, e, g)
    r = np.arange(n_experts * (G - 1))
    e, g1 = r // (G - 1), r % (G - 1) + 1  # symmetry row r: expert e of layer 0 on GPU g1 >= 1
    r2, e2 = np.nonzero(np.arange(n_experts) < e[:, None])  # every earlier expert e2 < e of row r2
    constraints = [
        _rows(n_var, z.size, [(z - n_x, z, 1.0), (z - n_x, x_from, -1.0)], -np.inf, 0),  # z <= x[l, i, g]
        _rows(n_var, z.size, [(z - n_x, z, 1.0), (z - n_x, x_to, -1.0)], -np.inf, 0),  # z <= x[l+1, j, g]
        _rows(n_var, n_layers * n_experts, [(xs // G, xs, 1.0)], 1, 1),  # one GPU per expert
        _rows(n_var, n_layers * G, [(xs // (n_experts * G) * G + xs % G, xs, 1.0)], cap, cap),  # cap per GPU
        _rows(n_var, len(own), [(x_from, z, 1.0), (own, own, -cap)], -np.inf, 0),  # cut on successors of i
        _rows(n_var, len(own), [(x_to - n_experts * G, z, 1.0), (own, own + n_experts * G, -cap)], -np.inf, 0),
        _rows(n_var, len(r), [(r, e * G + g1, 1.0), (r2, e2 * G + g1[r2] - 1, -1.0)], -np.inf, 0),  # symmetry
    ]
    upper = np.ones(n_var)
    upper[: n_experts * G] = (g <= np.arange(n_experts)[:, None]).ravel()  # x[0, e, g] = 0 for g > e
    scale = counts[counts > 0].mean()  # objective in units of the mean count, so HiGHS tolerances are meaningful
    cost = np.concatenate([np.zeros(n_x), -np.repeat(counts[pl, pi, pj] / scale, G)])
    res = milp(
        cost,
        integrality=np.r_[np.ones(n_x), np.zeros(n_var - n_x)],
        bounds=Bounds(0, upper),
        constraints=constraints,
        options={"time_limit": time_limit_s, "disp": False, "mip_rel_gap": 1e-6},
    )
    bound = getattr(res, "mip_dual_bound", None)  # lower bound on -stay / scale
    lower = max(0.0, float(counts.sum()) + bound * scale) if bound is not None and math.isfinite(bound) else None
    gpu_of = None if res.x is None else res.x[:n_x].reshape(n_layers, n_experts, G).argmax(axis=-1)
    return gpu_of, lower, res.status == 0 and gpu_of is not None


def solve(
    counts: np.ndarray, n_gpus: int, method: str = "ilp", time_limit_s: float = 60.0, model: str = ""
) -> Placement:
    """Place the experts of ``counts`` (L-1, E, E) on ``n_gpus`` GPUs with ``method`` ("ilp", "staged", "round_robin").

    ilp returns the better of the integer program (HiGHS, stopped after ``time_limit_s`` seconds of solving; model
    building and staged come on top) and the staged heuristic, with its gap to the best lower bound known (0.0 when
    HiGHS proved optimality, to its relative tolerance of 1e-6); a time-out never raises. Costs: see the module
    docstring.
    """
    start = time.perf_counter()
    counts = _check_counts(counts)
    _check_split(counts.shape[1], n_gpus)
    if method not in METHODS:
        raise EffdlError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float)) or not time_limit_s > 0:
        raise EffdlError(f"time_limit_s must be > 0, got {time_limit_s!r}")
    n_layers, n_experts = counts.shape[0] + 1, counts.shape[1]
    gap = None
    if method == "round_robin":
        gpu_of = round_robin(n_layers, n_experts, n_gpus)
    elif method == "staged" or n_gpus == 1 or counts.sum() == 0:  # ilp is trivial: every placement is optimal
        gpu_of, gap = _staged(counts, n_gpus), (None if method == "staged" else 0.0)
    else:
        gpu_of = _staged(counts, n_gpus)
        exact, lower, optimal = _ilp(counts, n_gpus, time_limit_s)
        if exact is not None and _stay(counts, exact) > _stay(counts, gpu_of):
            gpu_of = exact
        total = float(counts.sum())
        cross = total - _stay(counts, gpu_of)
        lower = max(lower or 0.0, total - _stay_upper_bound(counts, n_experts // n_gpus))
        gap = 0.0 if optimal or cross <= 0 else max(0.0, (cross - lower) / cross)
    return Placement(
        gpu_of=gpu_of,
        n_gpus=n_gpus,
        method=method,
        objective=cross_gpu_fraction(counts, gpu_of),
        gap=gap,
        solve_s=time.perf_counter() - start,
        model=model,
    )
