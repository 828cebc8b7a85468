"""Mixture-of-experts FFN, single process: Mixtral-style top-k routing, or GPT-MoE/Switch-style
(gate weights not renormalised over the k selected experts), with a load-balancing loss.

Dimension legend: N tokens (B*T flattened), D model dim, F expert hidden dim,
E experts, k experts per token, n rows routed to experts (N*k).

The router is a plain ``nn.Linear`` named ``gate`` so that tools which study
routing (ExFlow's affinity tracing) can attach a forward hook to it and see
the router logits without this module knowing about them. The expert maths
(``expert_outputs``) is a pure function so that expert-parallel runtimes run
exactly the same computation on the experts they hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def route_top_k(router_logits: Tensor, k: int, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Top-k routing: (N, E) logits -> weights (N, k) and expert ids (N, k), best first.

    ``normalize``: the weights are a softmax over the k selected logits
    (Mixtral's softmax-over-all-then-renormalise); otherwise they are the
    softmax-over-all probabilities of the selected experts (Switch / GPT-MoE,
    which is what lets a top-1 router learn from the language-model loss).
    Computed in fp32. Cost: O(N E).
    """
    probs = router_logits.float().softmax(dim=-1)  # (N, E)
    weights, experts = probs.topk(k, dim=-1)  # (N, k) each
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def balance_loss(router_logits: Tensor, experts: Tensor) -> Tensor:
    """Switch Transformer's load-balancing loss E * sum_e f_e * P_e for one layer (1.0 when balanced).

    f_e is the share of the N*k routed assignments that went to expert e and
    P_e the mean router probability of e. Cost: O(N E).
    """
    n_experts = router_logits.shape[-1]
    probs = router_logits.float().softmax(dim=-1)  # (N, E)
    share = torch.bincount(experts.flatten(), minlength=n_experts).float() / experts.numel()  # (E,)
    return n_experts * (share * probs.mean(dim=0)).sum()


def swiglu_expert(x: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """One SwiGLU expert on rows x (n, D) with fused gate/up weights w13 (2F, D) and w2 (D, F) -> (n, D)."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)  # (n, F) each
    return F.linear(F.silu(gate) * up, w2)  # (n, D)


def expert_outputs(x: Tensor, experts: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """Row r of x (n, D) through expert ``experts[r]`` of the stacked weights w13 (E, 2F, D), w2 (E, D, F).

    Rows are grouped by expert with one stable sort, so each expert runs one
    matmul over its rows. Cost: O(n D F) flops plus O(n log n) for the sort.
    """
    order = experts.argsort(stable=True)  # (n,)
    counts = torch.bincount(experts, minlength=w13.shape[0]).tolist()
    out = torch.empty_like(x)  # (n, D)
    start = 0
    for e, count in enumerate(counts):
        if count:
            rows = order[start:start + count]
            out[rows] = swiglu_expert(x[rows], w13[e], w2[e])
            start += count
    return out


class MoEFeedForward(nn.Module):
    """E SwiGLU experts with stacked weights; each token is processed by its top-k experts.

    In training mode the layer keeps its load-balancing loss of the last
    forward in ``self.balance_loss`` for the trainer to add.
    """

    def __init__(self, dim: int, ffn_dim: int, n_experts: int, experts_per_token: int, normalize: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.n_experts, self.k, self.normalize = n_experts, experts_per_token, normalize
        self.gate = nn.Linear(dim, n_experts, bias=False, device=device, dtype=dtype)
        # Stacked like nn.Linear weights (out, in): w13[e] is expert e's fused gate/up projection.
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * ffn_dim, dim, device=device, dtype=dtype))  # (E, 2F, D)
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, ffn_dim, device=device, dtype=dtype))  # (E, D, F)
        self.balance_loss: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        router_logits = self.gate(x)  # (N, E)
        weights, experts = route_top_k(router_logits, self.k, self.normalize)  # (N, k) each
        self.balance_loss = balance_loss(router_logits, experts) if self.training else None
        rows = x.repeat_interleave(self.k, dim=0)  # (N*k, D): token t's k copies at rows t*k .. t*k+k-1
        y = expert_outputs(rows, experts.flatten(), self.w13, self.w2)  # (N*k, D)
        y = y.view(-1, self.k, shape[-1]) * weights.to(x.dtype)[..., None]  # (N, k, D)
        return y.sum(dim=1).view(shape)
