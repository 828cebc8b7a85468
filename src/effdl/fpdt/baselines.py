"""What FPDT is measured against: plain training, activation checkpointing, and Ulysses sequence parallelism.

All three compute the same loss as ``fpdt_loss`` on the same model, so the
benchmarks and tests compare like with like; only where activations live
differs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from effdl.core.transformer import Transformer
from effdl.fpdt.pipeline import (
    IGNORE_INDEX,
    ChunkPipeline,
    FPDTConfig,
    ce_sum,
    check_sequence_parallel,
    on_backward_end,
    pad_to_multiple,
    sum_gradients,
)
from effdl.fpdt.store import OffloadStore
from effdl.fpdt.ulysses import group_rank, group_size, local_token_index, sum_across_ranks
from effdl.train.lm import lm_loss


def plain_loss(model: Transformer, tokens: Tensor, targets: Tensor) -> Tensor:
    """Every activation of every layer kept for the backward: the memory FPDT is measured against."""
    return lm_loss(model, tokens, targets)


def checkpointed_loss(model: Transformer, tokens: Tensor, targets: Tensor) -> Tensor:
    """Activation checkpointing per layer: only layer inputs are kept; each layer is recomputed in the backward."""
    T = tokens.shape[1]
    cos, sin = model.rope(torch.arange(T, device=tokens.device)[None])  # (1, 1, T, Dh)
    h = model.embed(tokens)  # (B, T, D)
    for layer in model.layers:
        h = checkpoint(layer, h, cos, sin, None, use_reentrant=False)
    logits = model.head(h).float()  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def ulysses_loss(model: Transformer, tokens: Tensor, targets: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """DeepSpeed-Ulysses: each rank holds S / P tokens; attention runs on the whole sequence for H / P heads.

    One chunk spanning the sequence, plain autograd (every activation kept),
    SDPA for attention, gradients summed over the group after the backward.
    """
    world = group_size(group)
    tokens, targets = pad_to_multiple(tokens, targets, world)
    S = tokens.shape[1]
    cfg = FPDTConfig(chunk_size=S, offload="none", sp_size=world)
    check_sequence_parallel(model, cfg, S, group)
    index = local_token_index(S, S, world, group_rank(group)).to(tokens.device)  # (S / P,)
    pipe = ChunkPipeline(model, cfg, S, group, OffloadStore(), index)
    h = model.embed(tokens[:, index])  # (B, S / P, D)
    for layer in model.layers:
        q, k, v = pipe.project_qkv(layer, h, 0)  # (B, H / P, S, Dh), (B, K / P, S, Dh) x2
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        h = pipe.residual_and_ffn(layer, h, out)
    local = ce_sum(model, h, targets[:, index])
    loss = sum_across_ranks(local / (targets != IGNORE_INDEX).sum().clamp_min(1), group)
    return on_backward_end(loss, lambda: sum_gradients(model, group))
