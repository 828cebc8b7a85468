"""Inter-layer expert affinity: how strongly a token's expert at layer l predicts its expert at layer l+1.

Dimension legend: N tokens, L MoE layers, k experts per token, E experts.

``counts[l, i, j]`` is the number of tokens routed to expert i at layer l
and expert j at layer l+1. With top-k routing a token contributes each of its
k x k (i, j) pairs with weight 1/k^2, so every token adds exactly 1 to each
layer transition and counts stay comparable across k.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from effdl.errors import EffdlError


def transition_counts(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """(L-1, E, E) float64 transition counts from a trace's (N, L, k) expert ids. Cost: O(N L k^2)."""
    if experts.ndim != 3:
        raise EffdlError(f"expert ids must be (tokens, layers, k), got shape {experts.shape}")
    _, n_layers, k = experts.shape
    if experts.size and (experts.min() < 0 or experts.max() >= n_experts):
        raise EffdlError(f"expert ids must lie in [0, {n_experts}), found {experts.min()}..{experts.max()}")
    counts = np.zeros((max(n_layers - 1, 0), n_experts, n_experts))
    ids = experts.astype(np.int64)
    for layer in range(n_layers - 1):
        src = np.repeat(ids[:, layer], k, axis=1).ravel()  # (N*k*k,) each source paired with every target
        dst = np.tile(ids[:, layer + 1], (1, k)).ravel()  # (N*k*k,)
        counts[layer] = np.bincount(src * n_experts + dst, minlength=n_experts**2).reshape(n_experts, n_experts)
    return counts / k**2


def conditional_probs(counts: np.ndarray) -> np.ndarray:
    """P(expert j at l+1 | expert i at l), (L-1, E, E); a row no token visited is all zeros. Cost: O(L E^2)."""
    rows = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts, dtype=float), where=rows > 0)


def affinity_score(counts: np.ndarray) -> float:
    """Mean over layer transitions of I(X_l; X_l+1) / H(X_l+1), in [0, 1].

    The mutual information is the KL divergence of the joint routing
    distribution from the product of its marginals, so 0 means routing at l+1
    is independent of routing at l (the baseline of no affinity) and 1 means
    it is fully determined by it. Cost: O(L E^2).
    """
    scores = []
    for c in counts:
        total = c.sum()
        if total == 0:
            continue
        joint = c / total
        p_src, p_dst = joint.sum(axis=1), joint.sum(axis=0)
        nz = joint > 0
        mutual = (joint[nz] * np.log(joint[nz] / np.outer(p_src, p_dst)[nz])).sum()
        entropy = -(p_dst[p_dst > 0] * np.log(p_dst[p_dst > 0])).sum()
        scores.append(mutual / entropy if entropy > 0 else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def plot_affinity(path: str | Path, counts: np.ndarray, title: str, layers: Sequence[int] | None = None) -> Path:
    """Heatmaps of P(j at l+1 | i at l) for up to four layer transitions, one PNG."""
    from effdl.report import heatmaps

    layers = list(layers) if layers is not None else list(range(min(4, len(counts))))
    probs = conditional_probs(counts)
    return heatmaps(path, [probs[layer] for layer in layers],
                    [f"layer {layer} -> {layer + 1}" for layer in layers], title=title,
                    xlabel="expert at l+1", ylabel="expert at l", colorbar="P(j | i)")
