"""Mixtral-style mixture-of-experts FFN, single process.

Dimension legend: N tokens (B*T flattened), D model dim, F expert hidden dim,
E experts, k experts per token.

The router is a plain ``nn.Linear`` named ``gate`` so that tools which study
routing (ExFlow's affinity tracing) can attach a forward hook to it and see
the router logits without this module knowing about them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def route_top_k(router_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k routing: (N, E) logits -> weights (N, k) and expert ids (N, k).

    The weights are a softmax over the k selected logits, which equals
    Mixtral's softmax-over-all-then-renormalise. Computed in fp32. Cost: O(N E).
    """
    top_logits, experts = router_logits.float().topk(k, dim=-1)  # (N, k) each
    return top_logits.softmax(dim=-1), experts


class MoEFeedForward(nn.Module):
    """E SwiGLU experts with stacked weights; each token is processed by its top-k experts."""

    def __init__(self, dim: int, ffn_dim: int, n_experts: int, experts_per_token: int, device=None, dtype=None):
        super().__init__()
        self.n_experts, self.k = n_experts, experts_per_token
        self.gate = nn.Linear(dim, n_experts, bias=False, device=device, dtype=dtype)
        # Stacked like nn.Linear weights (out, in): w13[e] is expert e's fused gate/up projection.
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * ffn_dim, dim, device=device, dtype=dtype))  # (E, 2F, D)
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, ffn_dim, device=device, dtype=dtype))  # (E, D, F)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e's SwiGLU on tokens x (n, D) -> (n, D)."""
        gate, up = F.linear(x, self.w13[e]).chunk(2, dim=-1)  # (n, F) each
        return F.linear(F.silu(gate) * up, self.w2[e])  # (n, D)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        weights, experts = route_top_k(self.gate(x), self.k)  # (N, k) each

        # Group the N*k (token, expert) assignments by expert with one sort.
        flat_experts = experts.flatten()  # (N*k,)
        order = flat_experts.argsort(stable=True)  # (N*k,)
        counts = torch.bincount(flat_experts, minlength=self.n_experts).tolist()
        token_of = order // self.k  # (N*k,) token index of each sorted assignment
        weight_of = weights.flatten()[order].to(x.dtype)  # (N*k,)

        out = torch.zeros_like(x)  # (N, D)
        start = 0
        for e, n in enumerate(counts):
            if n:
                idx = token_of[start:start + n]  # (n,)
                out.index_add_(0, idx, self.expert(e, x[idx]) * weight_of[start:start + n, None])
            start += n
        return out.view(shape)
