"""ExFlow: inter-layer expert affinity, expert placement, and context-coherent expert parallelism.

    trace.py      routing traces of a model over text (.npz)
    affinity.py   transition counts, P(expert at l+1 | expert at l), affinity score, heatmaps
    placement.py  ilp / staged / round-robin placement of experts on GPUs
    parallel.py   expert-parallel inference: standard (2 all-to-alls per layer) vs coherent (1)
    simulate.py   all-to-all time per layer on a multi-node topology, for deployments beyond this machine
"""

from effdl.exflow.affinity import affinity_score, conditional_probs, transition_counts
from effdl.exflow.placement import Placement, cross_gpu_fraction, round_robin, solve
from effdl.exflow.trace import RoutingTrace, record_trace, trace_corpus

__all__ = ["Placement", "RoutingTrace", "affinity_score", "conditional_probs", "cross_gpu_fraction",
           "record_trace", "round_robin", "solve", "trace_corpus", "transition_counts"]
