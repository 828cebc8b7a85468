"""The model's linear layers through oneDNN with prepacked weights, for CPU serving.

A decode step multiplies a few dozen rows by every weight matrix, a shape at
which a plain sgemm wastes most of the CPU: on the 2-core machine of
``benchmarks/flover_vs_vllm.py`` oneDNN with weights reordered once into its
blocked layout is 1.5x (512 x 1536) to 2.5x (the 512 x 8192 LM head) faster
at 32 rows. That is what vLLM's CPU backend does too. The packed copies cost
as much memory as the weights; the model itself is left untouched, and the
packed path is installed only while the runner executes a step, so the same
model object still runs its own forward everywhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn

ROWS_HINT = 32  # oneDNN picks its blocking for this many rows; any row count works


def packed_linear_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch can run fp32 linears on ``device`` through oneDNN's prepacked GEMM."""
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _packed_forward(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """x (..., in) @ W.T + b with W in oneDNN's packed layout -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class PackedLinears:
    """oneDNN-packed copies of every ``nn.Linear`` weight of ``model``, made once (weights must not change after)."""

    def __init__(self, model: nn.Module):
        self._packed = {m: (torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), ROWS_HINT), m.bias)
                        for m in model.modules() if isinstance(m, nn.Linear)}

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Inside: each linear runs the packed GEMM (its forward hooks, e.g. tensor parallelism's, still run)."""
        for module, (weight, bias) in self._packed.items():
            module.forward = partial(_packed_forward, weight, None if bias is None else bias.detach())
        try:
            yield
        finally:
            for module in self._packed:
                del module.forward  # back to the class's own forward
