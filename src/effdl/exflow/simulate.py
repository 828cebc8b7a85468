"""What expert-parallel MoE inference communicates, and how long it takes: standard vs ExFlow's coherent mode.

Dimension legend: N tokens, L MoE layers, k experts per token (top-k, column 0
= highest gate weight), E experts per layer, G ranks (GPUs).

Inputs are a routing trace ``experts`` (N, L, k) of expert ids and a placement
``gpu_of`` (L, E): the rank holding expert e of layer l. Token n's home rank
is n % G (requests spread evenly over the ranks).

- ``standard`` (DeepSpeed-MoE, Tutel): per layer, an all-to-all *dispatch*
  sends one copy of each token from its home rank to the rank of each of its
  k experts, and an all-to-all *combine* sends every copy back home. Two
  all-to-alls per layer.
- ``coherent`` (ExFlow): every rank keeps the whole context, so a token stays
  where its top-1 expert ran and runs the next layer's attention there. At
  layer 0 it starts at home; at layer l > 0 it sits on
  ``gpu_of[l - 1, experts[n, l - 1, 0]]`` and is dispatched to its layer-l
  experts' ranks: one all-to-all per layer for k = 1. For k > 1 the secondary
  experts' outputs go to the primary expert's rank in a second all-to-all
  ("combine"). Once per forward step the new tokens' K/V must reach every
  rank: an all-gather of ``kv_bytes_per_token`` per token.

Traffic is counted in token copies; a copy from a rank to itself is free.
The time model is deliberately simple (see ``all_to_all_seconds``): it
ranks placements and modes by communication, it does not predict wall-clock
time of a real model (no compute, no overlap, no congestion).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from effdl.errors import EffdlError

MODES = ("standard", "coherent")


@dataclass(frozen=True)
class Topology:
    """G ranks in nodes of ``gpus_per_node``; ranks r and s share a node when r // gpus_per_node == s // ...

    Bandwidths are per rank in GB/s (1e9 bytes/s), one value within a node and
    one across nodes; latencies are per message in microseconds. Defaults are
    the paper's A100 nodes of 4 GPUs (NVLink-class within, HDR200 InfiniBand
    across). Fewer ranks than ``gpus_per_node`` means one (partial) node.
    """

    n_gpus: int
    gpus_per_node: int = 4  # the paper's A100 nodes
    intra_gbps: float = 200.0  # GB/s per rank within a node (NVLink-class)
    inter_gbps: float = 25.0  # GB/s per rank across nodes (HDR200 InfiniBand)
    intra_latency_us: float = 3.0
    inter_latency_us: float = 8.0

    def __post_init__(self):
        for name in ("n_gpus", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise EffdlError(f"Topology.{name} must be a positive integer, got {value!r}")
        for name in ("intra_gbps", "inter_gbps"):
            if not getattr(self, name) > 0:
                raise EffdlError(f"Topology.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("intra_latency_us", "inter_latency_us"):
            if not getattr(self, name) >= 0:
                raise EffdlError(f"Topology.{name} must be non-negative, got {getattr(self, name)!r}")
        if self.n_gpus >= self.gpus_per_node and self.n_gpus % self.gpus_per_node:
            raise EffdlError(
                f"Topology.n_gpus = {self.n_gpus} is not a whole number of nodes of {self.gpus_per_node} GPUs"
            )

    @property
    def n_nodes(self) -> int:
        return max(1, self.n_gpus // self.gpus_per_node)

    def node_of(self, rank: int | np.ndarray) -> int | np.ndarray:
        """The node index of a rank (or an array of ranks)."""
        return rank // self.gpus_per_node

    def _cross_node(self) -> np.ndarray:
        """(G, G) bool: True where ranks a and b sit on different nodes."""
        node = self.node_of(np.arange(self.n_gpus))  # (G,)
        return node[:, None] != node[None, :]  # (G, G)


@dataclass
class SimResult:
    """Communication of one forward step over a trace (all N tokens, all L layers) in one mode."""

    mode: str
    n_tokens: int
    seconds_per_layer: np.ndarray  # (L,) all-to-all time per MoE layer, all kinds summed
    cross_rank_copies: np.ndarray  # (L,) token copies sent to another rank per layer, all kinds
    cross_node_copies: np.ndarray  # (L,) of which to another node
    collectives_per_layer: float  # all-to-alls issued per MoE layer: standard 2; coherent 1 for k == 1, 2 for k > 1
    allgather_seconds: float  # coherent: the per-step K/V all-gather; 0 for standard

    @property
    def total_seconds(self) -> float:
        """All-to-all time over all layers plus the K/V all-gather."""
        return float(self.seconds_per_layer.sum()) + self.allgather_seconds


def _check_trace(experts, gpu_of, mode: str, n_gpus: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Validated (experts, gpu_of, G); G defaults to gpu_of.max() + 1."""
    experts, gpu_of = np.asarray(experts), np.asarray(gpu_of)
    if mode not in MODES:
        raise EffdlError(f"unknown mode {mode!r}; expected one of {MODES}")
    if experts.ndim != 3:
        raise EffdlError(f"experts must be 3-D (N tokens, L layers, k), got shape {experts.shape}")
    if 0 in experts.shape:
        raise EffdlError(f"experts must have at least one token, layer and expert per token, got shape {experts.shape}")
    if not np.issubdtype(experts.dtype, np.integer):
        raise EffdlError(f"experts must hold integer expert ids, got dtype {experts.dtype}")
    n_layers = experts.shape[1]
    if gpu_of.ndim != 2 or gpu_of.shape[0] != n_layers or gpu_of.shape[1] == 0:
        raise EffdlError(f"gpu_of must be (L, E) with L = {n_layers} as in experts, got shape {gpu_of.shape}")
    if not np.issubdtype(gpu_of.dtype, np.integer):
        raise EffdlError(f"gpu_of must hold integer ranks, got dtype {gpu_of.dtype}")
    n_experts = gpu_of.shape[1]
    bad = (experts < 0) | (experts >= n_experts)
    if bad.any():
        n, layer, j = np.argwhere(bad)[0]
        raise EffdlError(
            f"expert id {experts[n, layer, j]} (token {n}, layer {layer}, choice {j}) is out of range [0, {n_experts})"
        )
    if gpu_of.min() < 0:
        layer, e = np.argwhere(gpu_of < 0)[0]
        raise EffdlError(f"gpu_of places expert {e} of layer {layer} on rank {gpu_of[layer, e]}, which is negative")
    n_gpus = int(gpu_of.max()) + 1 if n_gpus is None else n_gpus
    if gpu_of.max() >= n_gpus:
        layer, e = np.argwhere(gpu_of >= n_gpus)[0]
        raise EffdlError(
            f"gpu_of places expert {e} of layer {layer} on rank {gpu_of[layer, e]}, but there are {n_gpus} ranks"
        )
    return experts, gpu_of, n_gpus


def _count(layer: np.ndarray, src: np.ndarray, dst: np.ndarray, n_layers: int, n_gpus: int) -> np.ndarray:
    """(L, G, G) counts of (layer, src, dst) triples; the arguments broadcast against each other."""
    index = (layer * n_gpus + src) * n_gpus + dst
    counts = np.bincount(index.ravel(), minlength=n_layers * n_gpus * n_gpus)
    return counts.reshape(n_layers, n_gpus, n_gpus)  # (L, G, G)


def traffic_matrices(experts, gpu_of, mode: str, n_gpus: int | None = None) -> dict[str, np.ndarray]:
    """Token copies per layer from rank a to rank b, shape (L, G, G), for each all-to-all: "dispatch" and "combine".

    ``standard``: dispatch sends one copy per selected expert from the token's
    home rank (n % G) to the expert's rank; combine is its transpose (every
    copy returns home). ``coherent``: dispatch sends from where the token sits
    (home at layer 0, then its previous layer's top-1 expert's rank) to each
    expert's rank; combine sends each secondary expert's output (k - 1 copies
    per token) to the primary expert's rank, so it is all zeros for k = 1.
    The diagonal holds copies that stay on their rank (free). One copy per
    selected expert even when two experts share a rank, as Tutel sends them.
    ``n_gpus`` is G (defaults to gpu_of.max() + 1). Cost: O(N L k + L G^2)
    time and memory.
    """
    return _traffic(*_check_trace(experts, gpu_of, mode, n_gpus), mode)


def _traffic(experts: np.ndarray, gpu_of: np.ndarray, n_gpus: int, mode: str) -> dict[str, np.ndarray]:
    n_tokens, n_layers, _ = experts.shape
    layer = np.arange(n_layers)[None, :, None]  # (1, L, 1)
    dst = gpu_of[layer, experts]  # (N, L, k) rank of each selected expert
    home = (np.arange(n_tokens) % n_gpus)[:, None, None]  # (N, 1, 1)
    if mode == "standard":
        dispatch = _count(layer, home, dst, n_layers, n_gpus)
        return {"dispatch": dispatch, "combine": dispatch.transpose(0, 2, 1).copy()}
    primary = dst[:, :, :1]  # (N, L, 1) rank of the top-1 expert
    src = np.concatenate([home, primary[:, :-1]], axis=1)  # (N, L, 1) where the token sits before layer l
    return {
        "dispatch": _count(layer, src, dst, n_layers, n_gpus),
        "combine": _count(layer, dst[:, :, 1:], primary, n_layers, n_gpus),
    }


def _a2a_seconds(traffic: np.ndarray, bytes_per_token: float, topo: Topology) -> np.ndarray:
    """All-to-all seconds (...,) of token counts (..., G, G); the model of ``all_to_all_seconds``, batched."""
    cross = topo._cross_node()  # (G, G)
    off_rank = traffic * (1 - np.eye(topo.n_gpus))  # (..., G, G) self-messages are free
    latency = np.where(cross, topo.inter_latency_us, topo.intra_latency_us) * 1e-6  # (G, G) seconds
    bandwidth = np.where(cross, topo.inter_gbps, topo.intra_gbps) * 1e9  # (G, G) bytes/s
    cost = (off_rank > 0) * latency + off_rank * bytes_per_token / bandwidth  # (..., G, G) seconds per message
    per_rank = np.maximum(cost.sum(axis=-1), cost.sum(axis=-2))  # (..., G) send vs receive
    return per_rank.max(axis=-1)


def _check_bytes(name: str, value: float) -> None:
    if not value >= 0:
        raise EffdlError(f"{name} must be non-negative, got {value!r}")


def all_to_all_seconds(traffic: np.ndarray, bytes_per_token: float, topo: Topology) -> float:
    """Time of one all-to-all with (G, G) token counts ``traffic`` [from rank a to rank b].

    Model: every rank sends all its off-rank messages at once. A rank's send
    time is the sum over its non-empty messages of the latency (intra- or
    inter-node) plus intra-node bytes / ``intra_gbps`` plus inter-node bytes /
    ``inter_gbps``; its receive time is the same over the messages it
    receives. The all-to-all lasts the max over ranks of max(send, receive).
    Simplifications: latencies add up (no pipelining of messages), links are
    full duplex, each rank has its own inter-node bandwidth (no NIC sharing
    within a node, no switch congestion), no overlap with compute.
    Messages from a rank to itself cost nothing; one rank costs 0 s. Cost: O(G^2).
    """
    traffic = np.asarray(traffic)
    if traffic.shape != (topo.n_gpus, topo.n_gpus):
        raise EffdlError(f"traffic must be (G, G) with G = {topo.n_gpus} ranks, got shape {traffic.shape}")
    if (traffic < 0).any():
        raise EffdlError("traffic must hold non-negative token counts")
    _check_bytes("bytes_per_token", bytes_per_token)
    return float(_a2a_seconds(traffic, bytes_per_token, topo))


def simulate(
    experts, gpu_of, mode: str, topo: Topology, bytes_per_token: float, kv_bytes_per_token: float = 0.0
) -> SimResult:
    """Per-layer all-to-all time and cross-rank / cross-node copies of one forward step over the trace.

    ``bytes_per_token`` is the size of one token copy (hidden dim x dtype
    size). For ``coherent`` the per-step K/V all-gather is modelled as every
    rank sending its home tokens' ``kv_bytes_per_token`` to every other rank
    in one all-to-all (same cost model); 0 disables it, and standard mode has
    none. Cost: O(N L k + L G^2).
    """
    experts, gpu_of, n_gpus = _check_trace(experts, gpu_of, mode, topo.n_gpus)
    _check_bytes("bytes_per_token", bytes_per_token)
    _check_bytes("kv_bytes_per_token", kv_bytes_per_token)
    n_tokens, _, k = experts.shape
    traffic = _traffic(experts, gpu_of, n_gpus, mode)
    both = traffic["dispatch"] + traffic["combine"]  # (L, G, G)
    seconds = sum(_a2a_seconds(t, bytes_per_token, topo) for t in traffic.values())  # (L,)
    off_rank = both * (1 - np.eye(topo.n_gpus, dtype=both.dtype))  # (L, G, G)
    allgather = 0.0
    if mode == "coherent" and kv_bytes_per_token > 0:
        per_home = np.bincount(np.arange(n_tokens) % topo.n_gpus, minlength=topo.n_gpus)  # (G,) tokens held
        gather = np.broadcast_to(per_home[:, None], (topo.n_gpus, topo.n_gpus))  # (G, G) to every rank
        allgather = float(_a2a_seconds(gather, kv_bytes_per_token, topo))
    return SimResult(
        mode=mode,
        n_tokens=n_tokens,
        seconds_per_layer=seconds,
        cross_rank_copies=off_rank.sum(axis=(1, 2)),
        cross_node_copies=(both * topo._cross_node()).sum(axis=(1, 2)),
        collectives_per_layer=2.0 if mode == "standard" or k > 1 else 1.0,
        allgather_seconds=allgather,
    )


def plan_table(
    experts, placements: dict[str, np.ndarray], topo: Topology, bytes_per_token: float, kv_bytes_per_token: float = 0.0
) -> list[dict]:
    """Standard mode on the first placement, then coherent mode on each named placement: one row each.

    Row keys: ``label`` (placement name), ``mode``, ``a2a_per_layer``
    (all-to-alls per MoE layer), ``cross_rank_per_token_layer`` and
    ``cross_node_per_token_layer`` (mean token copies leaving a rank / node
    per token per layer), ``ms_per_step`` (communication of one forward over
    the trace, all-gather included) and ``speedup`` (standard row's time /
    this row's; 1.0 for the standard row). Standard-mode volume barely
    depends on the placement, hence one standard row.
    """
    if not placements:
        raise EffdlError("placements must name at least one placement")
    first = next(iter(placements))
    runs = [(first, simulate(experts, placements[first], "standard", topo, bytes_per_token))]
    runs += [
        (label, simulate(experts, gpu_of, "coherent", topo, bytes_per_token, kv_bytes_per_token))
        for label, gpu_of in placements.items()
    ]
    baseline = runs[0][1].total_seconds
    rows = []
    for label, result in runs:
        per_token_layer = result.n_tokens * len(result.seconds_per_layer)
        total = result.total_seconds
        rows.append(
            {
                "label": label,
                "mode": result.mode,
                "a2a_per_layer": result.collectives_per_layer,
                "cross_rank_per_token_layer": float(result.cross_rank_copies.sum()) / per_token_layer,
                "cross_node_per_token_layer": float(result.cross_node_copies.sum()) / per_token_layer,
                "ms_per_step": total * 1e3,
                "speedup": baseline / total if total > 0 else (1.0 if baseline == 0 else float("inf")),
            }
        )
    return rows
