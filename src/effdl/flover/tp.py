"""Megatron-style tensor parallelism for serving, applied from outside the single-device model.

Each of P ranks holds a slice of every layer and runs the same step plan:

- attention: H/P query heads and K/P key/value heads per rank (rows of the
  fused ``wqkv`` and its bias), so each rank's KV pool holds only its heads;
  ``wo`` keeps the matching input columns and its partial sums are all-reduced;
- FFN: F/P columns of the gate and of the up half of ``w13``, the matching
  input columns of ``w2``, then an all-reduce;
- LM head: vocabulary-parallel rows of ``output``, then an all-gather so that
  every rank holds the full logits. When P does not divide V, the last shard
  is padded with zero rows and the padding is dropped after the gather.

Embeddings and norms are replicated. Only rank 0 schedules and samples:
``TPRunner`` broadcasts each ``StepPlan`` before running it, and the other
ranks ``follow``, executing the plans they receive. A step that fails on any
rank ends the group (see ``follow``). MoE models are not split.

Dimension legend:
    P  ranks (tensor-parallel world size)
    H  query heads      K  key/value heads      Dh  head dim
    F  FFN hidden dim   V  vocabulary           Vp  vocabulary rows per rank, ceil(V / P)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from effdl.core.config import ModelConfig
from effdl.core.tokenizer import Tokenizer
from effdl.core.transformer import Transformer
from effdl.distributed import abandon
from effdl.errors import EffdlError
from effdl.flover.engine import Engine, RunnerFailure, default_max_len, prefix_cache_rows
from effdl.flover.prefix_cache import BLOCK_SIZE
from effdl.flover.runner import ModelRunner
from effdl.flover.scheduler import StepPlan


def shard_config(cfg: ModelConfig, world_size: int) -> ModelConfig:
    """The config of one rank's slice: H/P heads, K/P kv heads, F/P FFN columns, same head_dim.

    ``vocab_size`` stays the full vocabulary: the embedding is replicated and
    the gathered logits are full. The slice's LM head is its own tensor, so
    ``tie_embeddings`` is off. Raises ``EffdlError`` for MoE models and when P
    does not divide H, K or F. Cost: O(1).
    """
    if cfg.is_moe:
        raise EffdlError(f"tensor parallelism does not split MoE models ({cfg.n_experts} experts); "
                         "serve this model on one device")
    if world_size < 1:
        raise EffdlError(f"the tensor-parallel world size must be >= 1, got {world_size}")
    split = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "ffn_dim": cfg.ffn_dim}
    bad = [f"{name} {size}" for name, size in split.items() if size % world_size]
    if bad:
        raise EffdlError(f"tensor parallelism over {world_size} ranks splits heads and FFN columns evenly, "
                         f"but {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not divisible by {world_size}")
    return cfg.replace(**{name: size // world_size for name, size in split.items()}, head_dim=cfg.head_dim,
                       tie_embeddings=False)


def shard_state_dict(state: dict[str, Tensor], cfg: ModelConfig, rank: int, world_size: int
                     ) -> dict[str, Tensor]:
    """Rank ``rank``'s slice of a full ``Transformer`` state dict (``cfg`` is the full model's config).

    Fused matrices are split part by part (q | k | v, gate | up), so each
    rank's slice is again fused in the same layout. Split tensors are new
    (the full ones can be freed); replicated ones are the same tensors.
    Cost: one copy of the rank's share of the attention, FFN and LM-head
    weights, O(params / P).
    """
    P, Dh, V = world_size, cfg.head_dim, cfg.vocab_size
    padded_vocab = P * math.ceil(V / P)  # P*Vp
    qkv = [cfg.n_heads * Dh, cfg.n_kv_heads * Dh, cfg.n_kv_heads * Dh]
    rules = {  # name suffix -> (dim to split, sizes of the fused parts along it)
        "attention.wqkv.weight": (0, qkv),  # rows (H*Dh + 2*K*Dh, D)
        "attention.wqkv.bias": (0, qkv),
        "attention.wo.weight": (1, [cfg.n_heads * Dh]),  # columns (D, H*Dh)
        "feed_forward.w13.weight": (0, [cfg.ffn_dim, cfg.ffn_dim]),  # rows (2F, D)
        "feed_forward.w2.weight": (1, [cfg.ffn_dim]),  # columns (D, F)
        "output.weight": (0, [padded_vocab]),  # rows (P*Vp, D) once padded
    }
    local = {}
    for name, tensor in state.items():
        rule = next((r for suffix, r in rules.items() if name.endswith(suffix)), None)
        if rule is None:
            local[name] = tensor
            continue
        if name == "output.weight":
            tensor = F.pad(tensor, (0, 0, 0, padded_vocab - V))  # zero rows: (V, D) -> (P*Vp, D)
        dim, sizes = rule
        local[name] = torch.cat([part.chunk(P, dim)[rank] for part in tensor.split(sizes, dim)], dim)
    return local


def shard_model(model: Transformer, rank: int, world_size: int, group: dist.ProcessGroup | None = None
                ) -> Transformer:
    """Rank ``rank``'s slice of ``model`` as a new ``Transformer`` whose forward gives the full model's logits.

    ``model`` is left untouched; the slice shares its replicated tensors
    (embeddings, norms) and copies its share of the others, so dropping
    ``model`` afterwards frees the rest. The slice's forward runs one
    all-reduce after each ``wo`` and ``w2`` and one all-gather after
    ``output`` on ``group``, which must hold ``world_size`` ranks, this one
    being ``rank``; every rank must call it with identical weights.
    Cost: O(params / P) copied; per forward, 2L all-reduces of (B, T, D)
    and one all-gather of (B, T, Vp) (or (B, Vp) with ``logit_index``).
    """
    cfg = model.config
    local_cfg = shard_config(cfg, world_size)
    if (dist.get_rank(group), dist.get_world_size(group)) != (rank, world_size):
        raise EffdlError(f"asked for rank {rank} of {world_size}, but this process is rank {dist.get_rank(group)} "
                         f"of a group of {dist.get_world_size(group)}")
    local = Transformer(local_cfg, device="meta")  # the structure only; weights are assigned below
    local.output = nn.Linear(cfg.dim, math.ceil(cfg.vocab_size / world_size), bias=False, device="meta")
    local.load_state_dict(shard_state_dict(model.state_dict(), cfg, rank, world_size), assign=True)
    local.inv_freq = model.inv_freq  # a non-persistent buffer: not in the state dict
    for layer in local.layers:
        layer.attention.wo.register_forward_hook(partial(_all_reduce, group=group))
        layer.feed_forward.w2.register_forward_hook(partial(_all_reduce, group=group))
    local.output.register_forward_hook(partial(_gather_vocab, vocab_size=cfg.vocab_size, group=group))
    return local.train(model.training)


def _all_reduce(module: nn.Module, inputs: tuple, partial_sum: Tensor, group: dist.ProcessGroup | None
                ) -> Tensor:
    """Forward hook: sum the ranks' partial outputs (..., D) of a row-parallel Linear, in place."""
    with _collective():
        dist.all_reduce(partial_sum, group=group)
    return partial_sum


def _gather_vocab(module: nn.Module, inputs: tuple, shard: Tensor, vocab_size: int,
                  group: dist.ProcessGroup | None) -> Tensor:
    """Forward hook: the full logits (..., V) from every rank's (..., Vp), padding rows dropped."""
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    with _collective():
        dist.all_gather(shards, shard.contiguous(), group=group)
    return torch.cat(shards, dim=-1)[..., :vocab_size]  # (..., P*Vp) -> (..., V)


class TPRunner(ModelRunner):
    """Rank 0's runner: sends each plan to the other ranks of ``group``, then runs its own slice of it.

    The other ranks run ``follow`` on a ``ModelRunner`` over their own slice
    with the same ``n_slots`` and ``max_len``; ``stop()`` ends their loop.
    A failed step raises ``RunnerFailure``, now and on every later step.
    """

    def __init__(self, model: Transformer, n_slots: int, max_len: int, group: dist.ProcessGroup | None = None,
                 **runner_options: Any):
        super().__init__(model, n_slots, max_len, **runner_options)
        self.group = group
        self.failure: RunnerFailure | None = None  # set once a step failed: the group is gone

    def execute(self, plan: StepPlan) -> tuple[list[str], Tensor]:
        if self.failure is not None:
            raise self.failure
        try:
            _broadcast_plan(plan, self.group)
            return super().execute(plan)
        except Exception as error:
            self.failure = _end_group(self.group, error)
            raise self.failure from error

    def stop(self) -> None:
        """Release the followers: they leave ``follow`` once they receive this (a failed group has none left)."""
        if self.failure is None:
            _broadcast_plan(None, self.group)


def follow(runner: ModelRunner, group: dist.ProcessGroup | None = None) -> None:
    """The loop of ranks > 0: execute every plan rank 0 broadcasts, until it sends ``None``.

    The ranks cannot skip a step that fails on one of them: the others are
    then blocked in one of its collectives, or would pair their next
    collective with the wrong one. So a failure on any rank ends the group:
    that rank abandons it, which makes its peers' pending collectives fail at
    once (gloo) instead of waiting out the timeout, and every rank raises
    ``RunnerFailure``: the failing rank saying why, the others that a peer left.
    """
    try:
        while (plan := _broadcast_plan(None, group)) is not None:
            runner.execute(plan)
    except Exception as error:
        raise _end_group(group, error) from error


def _end_group(group: dist.ProcessGroup | None, error: Exception) -> RunnerFailure:
    """Abandon ``group`` after ``error`` ended a step on this rank; returns the error for this rank to raise."""
    rank = dist.get_rank(group)
    abandon(group)
    if isinstance(error, _PeerLost):
        return RunnerFailure(f"tensor-parallel rank {rank} lost its group mid-step: another rank failed (its own "
                             f"error says why) or left; the group is shut down ({error})")
    return RunnerFailure(f"tensor-parallel rank {rank} failed a step, {error!r}, and shut the group down")


def _broadcast_plan(plan: StepPlan | None, group: dist.ProcessGroup | None) -> StepPlan | None:
    """Rank 0 of ``group`` sends ``plan`` (pickled); every rank returns what rank 0 sent."""
    box = [plan]
    with _collective():
        dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


class _PeerLost(RuntimeError):
    """A collective of the tensor-parallel group failed: another rank left it (or never came)."""


@contextmanager
def _collective() -> Iterator[None]:
    """Mark a collective's failure as ``_PeerLost``, to tell it apart from this rank's own failure."""
    try:
        yield
    except RuntimeError as error:  # gloo raises a plain RuntimeError for a reset or closed connection
        raise _PeerLost(str(error)) from error


def tp_engine(model: Transformer, tokenizer: Tokenizer | None = None, max_slots: int = 8,
              max_len: int | None = None, group: dist.ProcessGroup | None = None, **engine_options: Any
              ) -> Engine | None:
    """Serve ``model`` split over every rank of ``group`` (under torchrun: after ``init_from_env``).

    Every rank calls this with the same model and options. Rank 0 gets an
    ``Engine`` whose steps drive all ranks; it must call
    ``engine.runner.stop()`` when done. The other ranks execute plans here
    until then, and get ``None``. ``engine_options`` are ``Engine``'s (policy,
    shuffle, prefill_chunk, prefix_caching ...). Every rank builds the engine, so bad options
    raise on all ranks alike instead of leaving followers waiting. Each
    rank's runner holds its own prefix-cache block store (its heads' K/V);
    the plan names the rows, so the stores stay alike.
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    local = shard_model(model, rank, world_size, group)
    max_len = max_len or default_max_len(model.config)
    prefix = {k: engine_options[k] for k in ("prefix_caching", "prefix_block_size", "prefix_cache_blocks")
              if k in engine_options}
    runner_options = dict(prefix_rows=prefix_cache_rows(max_slots, max_len, **prefix),
                          block_size=prefix.get("prefix_block_size", BLOCK_SIZE))
    runner = (TPRunner(local, max_slots, max_len, group, **runner_options) if rank == 0
              else ModelRunner(local, max_slots, max_len, **runner_options))
    engine = Engine(local, tokenizer, max_slots=max_slots, max_len=max_len, runner=runner, **engine_options)
    if rank == 0:
        return engine
    follow(runner, group)
    return None
