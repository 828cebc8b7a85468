"""Ulysses sequence parallelism: the token layout and the all-to-all between sequence and head sharding.

Dimension legend: B batch, P sequence-parallel ranks, S global tokens,
C global chunk, c = C / P local chunk, H heads (H / P per rank), Dh head dim.

Each rank holds S / P tokens of every sequence for all heads. Before
attention an all-to-all regroups a chunk so that each rank holds the whole
chunk for H / P heads; after attention the inverse all-to-all restores the
token sharding. FPDT runs this per chunk, so the token order on each rank is
permuted: rank r holds the r-th P-th of every global chunk, and after the
all-to-all of local chunk i every rank holds the contiguous global span of
chunk i.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from effdl.fpdt.attention import chunk_bounds


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def local_token_index(seq_len: int, chunk_size: int, world: int, rank: int) -> Tensor:
    """Global positions (S / P,) of the tokens rank ``rank`` holds, in its local order.

    For each global chunk [s, e) (the last may be shorter) the rank holds
    [s + rank * (e - s) / P, s + (rank + 1) * (e - s) / P). Needs every
    chunk's length divisible by P. Cost: O(S / P).
    """
    pieces = []
    for start, end in chunk_bounds(seq_len, chunk_size):
        share = (end - start) // world
        pieces.append(torch.arange(start + rank * share, start + (rank + 1) * share))
    return torch.cat(pieces)


def _exchange(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """all_to_all_single over dim 0 (P, ...): block r goes to rank r, block r of the result came from rank r."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous(): empty_like would copy a permuted input's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """(B, c, H, Dh) tokens-sharded -> (B, H/P, P*c, Dh) heads-sharded, tokens in rank order."""
    world = group_size(group)
    if world == 1:
        return x.transpose(1, 2)  # (B, H, c, Dh)
    B, c, H, Dh = x.shape
    blocks = x.view(B, c, world, H // world, Dh).permute(2, 0, 1, 3, 4)  # (P, B, c, H/P, Dh): block g -> rank g
    got = _exchange(blocks, group)  # (P, B, c, H/P, Dh): block r = rank r's tokens, my heads
    return got.permute(1, 3, 0, 2, 4).reshape(B, H // world, world * c, Dh)  # (B, H/P, P*c, Dh)


def heads_to_seq(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """(B, H/P, P*c, Dh) heads-sharded -> (B, c, H, Dh) tokens-sharded; the inverse of ``seq_to_heads``."""
    world = group_size(group)
    if world == 1:
        return x.transpose(1, 2)  # (B, c, H, Dh)
    B, Hp, T, Dh = x.shape
    c = T // world
    blocks = x.view(B, Hp, world, c, Dh).permute(2, 0, 3, 1, 4)  # (P, B, c, H/P, Dh): block r -> rank r
    got = _exchange(blocks, group)  # (P, B, c, H/P, Dh): block g = head group g of my tokens
    return got.permute(1, 2, 0, 3, 4).reshape(B, c, world * Hp, Dh)  # (B, c, H, Dh)


class _AllToAll(torch.autograd.Function):
    """A differentiable layout change: the forward applies ``there``, the backward its inverse ``back``."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None, there: Callable, back: Callable) -> Tensor:
        ctx.group, ctx.back = group, back
        return there(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return ctx.back(grad, ctx.group), None, None, None


def all_to_all_seq_to_heads(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable ``seq_to_heads``: its backward is the inverse all-to-all."""
    return _AllToAll.apply(x, group, seq_to_heads, heads_to_seq)


def all_to_all_heads_to_seq(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable ``heads_to_seq``: its backward is the inverse all-to-all."""
    return _AllToAll.apply(x, group, heads_to_seq, seq_to_heads)


class _SumAcrossRanks(torch.autograd.Function):
    """Forward: the sum of a scalar over the group. Backward: each rank's gradient of its own term (1 x grad)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        total = x.clone()
        if group_size(group) > 1:
            dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def sum_across_ranks(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    return _SumAcrossRanks.apply(x, group)
