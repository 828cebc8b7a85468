"""FPDT: run an ``effdl.core`` Transformer chunk by chunk, with idle chunks in an offload store.

Dimension legend: B batch, S global tokens, S_l = S / P tokens on this rank,
P sequence-parallel ranks, C global chunk, c_i local length of chunk i,
D model dim, H / K query / key-value heads (H_p = H / P, K_p = K / P on a
rank after the all-to-all), Dh head dim, V vocabulary.

``fpdt_loss(model, tokens, targets, cfg)`` returns the same mean
cross-entropy as ``model(tokens)`` would, and its backward leaves the same
parameter gradients, but no step ever holds more than a chunk's worth of
attention state. Per layer (``_FPDTBlock``):

forward, for chunk i = 0..u-1:
    store x_i (the layer input: activation checkpointing into the store);
    q, k, v = all-to-all(layer.qkv(x_i))   -> store q_i, k_i, v_i
              (RoPE at each local token's global position, so it commutes with the all-to-all)
    out_i, lse_i = merge over j <= i of attention(q_i, k_j, v_j)   (k/v prefetched)
    store out_i, lse_i;  y_i = layer.ffn_residual(layer.attention_residual(x_i, all-to-all(out_i)))
backward:
    per chunk: recompute y_i from x_i and out_i, backprop FFN and output projection -> dx_i (residual part),
               dout_i -> store
    outer loop over KV chunk j, inner over query chunks i >= j, from the stored
    out/lse (no attention recompute); dq_i waits in the store between visits.
    When chunk j's dq/dk/dv are final, backprop the QKV projection of chunk j.

The LM head (``model.head``) + cross-entropy runs per chunk and is
recomputed per chunk in the backward (``_ChunkedLMLoss``), so the [S, V]
logits never exist. With P > 1, the process group's ranks each hold their
share of the sequence, and parameter gradients are summed over the group when
the backward pass ends. FPDT touches the model only through its seams
(``embed``, ``rope``, ``Block.qkv`` / ``attention_residual`` /
``ffn_residual``, ``head``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from effdl.core.config import ModelConfig
from effdl.core.transformer import Block, Transformer
from effdl.errors import EffdlError
from effdl.fpdt.attention import BACKENDS, attend_query_chunk, attention_backward_chunks, chunk_bounds
from effdl.fpdt.store import OFFLOAD_KINDS, OffloadStore, make_store
from effdl.fpdt.ulysses import (
    all_to_all_heads_to_seq,
    all_to_all_seq_to_heads,
    group_rank,
    group_size,
    local_token_index,
    sum_across_ranks,
)

IGNORE_INDEX = -100


@dataclass
class FPDTConfig:
    chunk_size: int = 4096  # global chunk C: tokens of the whole sequence per pipeline step (C / P per rank)
    offload: str = "disk"  # "none" | "host" | "disk"
    spill_dir: str | None = None  # where "disk" spills (default: the system temp folder)
    sp_size: int = 1  # sequence-parallel ranks; must equal the process group's size
    backend: str = "auto"  # attention pair kernel: "auto" (flash where available) | "flash" | "math"
    loss_chunk: int | None = None  # tokens per LM-head chunk (default: default_loss_chunk(C / P))

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise EffdlError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.offload not in OFFLOAD_KINDS:
            raise EffdlError(f"unknown offload {self.offload!r}; choose one of {', '.join(OFFLOAD_KINDS)}")
        if self.sp_size < 1:
            raise EffdlError(f"sp_size must be >= 1, got {self.sp_size}")
        if self.chunk_size % self.sp_size:
            raise EffdlError(f"chunk_size {self.chunk_size} must be divisible by sp_size {self.sp_size}: "
                             f"each rank holds chunk_size / sp_size tokens of every chunk")
        if self.backend not in BACKENDS:
            raise EffdlError(f"unknown attention backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.loss_chunk is not None and self.loss_chunk <= 0:
            raise EffdlError(f"loss_chunk must be positive, got {self.loss_chunk}")


def check_sequence_parallel(model: Transformer, cfg: FPDTConfig, seq_len: int,
                            group: dist.ProcessGroup | None = None) -> None:
    """Every reason FPDT cannot run ``model`` at ``seq_len`` under ``cfg``, raised before any compute."""
    mc, world = model.config, group_size(group)
    if cfg.sp_size != world:
        raise EffdlError(f"FPDTConfig.sp_size is {cfg.sp_size} but the process group has {world} ranks "
                         f"(launch with torchrun --nproc-per-node {cfg.sp_size})")
    if mc.n_heads % world or mc.n_kv_heads % world:
        raise EffdlError(f"{mc.n_heads} query / {mc.n_kv_heads} key-value heads are not divisible by sp_size "
                         f"{world}: Ulysses gives every rank the same number of heads")
    if mc.sliding_window is not None and mc.sliding_window < seq_len:
        raise EffdlError(f"sliding-window attention (window {mc.sliding_window}) is not supported by FPDT")
    if cfg.chunk_size > seq_len:
        raise EffdlError(f"chunk_size {cfg.chunk_size} is longer than the sequence ({seq_len} tokens); "
                         f"use a chunk of at most {seq_len}")


def spill_bytes(cfg: ModelConfig, batch: int, seq_len: int, sp_size: int, elem: int) -> int:
    """Upper bound on what one training step puts in the store on one rank: every layer's chunks at once.

    Per local token and layer: the layer input x (D), q, out and dout (H Dh
    each: a rank holds all C / P tokens' worth of its H / P heads), k and v
    (K Dh each), plus fp32 dQ accumulators and the log-sum-exp.
    """
    per_token = cfg.dim + (3 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    per_token_fp32 = cfg.n_heads * (cfg.head_dim + 1)
    return cfg.n_layers * (batch * seq_len // sp_size) * (per_token * elem + per_token_fp32 * 4)


class ChunkPipeline:
    """What every layer's chunk loop shares for one training step: layout, positions, store, process group.

    ``index`` (S_l,) holds the global positions of this rank's tokens in local
    order (``local_token_index``), on the activations' device.
    """

    def __init__(self, model: Transformer, cfg: FPDTConfig, seq_len: int, group: dist.ProcessGroup | None,
                 store: OffloadStore, index: Tensor):
        self.model, self.cfg, self.group, self.store, self.index = model, cfg, group, store, index
        world = group_size(group)
        self.global_bounds = chunk_bounds(seq_len, cfg.chunk_size)
        sizes = [(end - start) // world for start, end in self.global_bounds]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.local_bounds = [(s, s + n) for s, n in zip(starts, sizes, strict=True)]
        self.n_chunks = len(self.global_bounds)
        self.scale = model.config.head_dim ** -0.5

    def rope(self, i: int) -> tuple[Tensor, Tensor]:
        """cos/sin (1, 1, c_i, Dh) at the global positions of this rank's tokens of chunk i."""
        start, end = self.local_bounds[i]
        return self.model.rope(self.index[None, start:end])

    def project_qkv(self, layer: Block, x: Tensor, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Chunk i's local tokens (B, c_i, D) -> q (B, H_p, C_i, Dh), k/v (B, K_p, C_i, Dh), roped, heads-sharded.

        RoPE is applied before the all-to-all, each token at its own global
        position; the all-to-all only moves whole (token, head) rows, so this
        equals roping the gathered chunk after it.
        """
        q, k, v = layer.qkv(x, *self.rope(i))  # (B, H, c_i, Dh), (B, K, c_i, Dh) x2
        return tuple(all_to_all_seq_to_heads(t.transpose(1, 2), self.group)  # (B, c_i, *, Dh) -> (B, *_p, C_i, Dh)
                     for t in (q, k, v))

    def residual_and_ffn(self, layer: Block, x: Tensor, out: Tensor) -> Tensor:
        """Block output (B, c, D) from its input x (B, c, D) and the heads-sharded attention output (B, H_p, C, Dh)."""
        out = all_to_all_heads_to_seq(out, self.group).transpose(1, 2)  # (B, c, H, Dh) -> (B, H, c, Dh)
        return layer.ffn_residual(layer.attention_residual(x, out))


class _FPDTBlock(torch.autograd.Function):
    """One transformer block over the whole local sequence, chunk by chunk; see the module docstring."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, pipe: ChunkPipeline, index: int) -> Tensor:
        layer, store = pipe.model.layers[index], pipe.store
        y = torch.empty_like(x)  # (B, S_l, D)
        for i, (start, end) in enumerate(pipe.local_bounds):
            x_i = x[:, start:end]  # (B, c_i, D)
            store.put((index, "x", i), x_i)
            q, k, v = pipe.project_qkv(layer, x_i, i)
            for name, t in (("q", q), ("k", k), ("v", v)):
                store.put((index, name, i), t)
            out, lse = attend_query_chunk(store, index, i, q, pipe.n_chunks, True, pipe.scale, pipe.cfg.backend)
            store.put((index, "out", i), out)
            store.put((index, "lse", i), lse)
            y[:, start:end] = pipe.residual_and_ffn(layer, x_i, out)
        if not ctx.needs_input_grad[0]:  # evaluation: nothing of this layer is needed again
            for key in store.chunk_keys():
                if key[0] == index:
                    store.discard(key)
        ctx.pipe, ctx.index = pipe, index
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None, None]:
        pipe, index = ctx.pipe, ctx.index
        layer, store = pipe.model.layers[index], pipe.store
        dx = torch.empty_like(dy)  # (B, S_l, D)
        with store.close_on_error(), torch.enable_grad():
            # FFN and output projection, per chunk, recomputed from the stored layer input and attention output.
            for i, (start, end) in enumerate(pipe.local_bounds):
                store.prefetch((index, "x", i + 1))
                store.prefetch((index, "out", i + 1))
                x_i = store.get((index, "x", i)).detach().requires_grad_()
                out = store.get((index, "out", i)).detach().requires_grad_()
                torch.autograd.backward(pipe.residual_and_ffn(layer, x_i, out), dy[:, start:end])
                dx[:, start:end] = x_i.grad
                store.put((index, "dout", i), out.grad)
            # Attention, outer loop over key/value chunks; then chunk j's QKV projection as soon as it is final.
            for j, dk, dv, finished in attention_backward_chunks(store, index, pipe.n_chunks, True, pipe.scale,
                                                                 pipe.cfg.backend):
                (_, dq), = finished
                start, end = pipe.local_bounds[j]
                x_j = store.get((index, "x", j)).detach().requires_grad_()
                q, k, v = pipe.project_qkv(layer, x_j, j)
                torch.autograd.backward((q, k, v), (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)))
                dx[:, start:end] += x_j.grad
                for name in ("x", "q", "k", "v", "out", "lse", "dout"):
                    store.discard((index, name, j))
        if index == 0:  # the pipeline's last backward: the store is empty, and a failure after it must not keep it
            store.close()
        return dx, None, None


class _OnBackwardEnd(torch.autograd.Function):
    """Identity on the loss whose backward queues ``callback`` to run once the whole backward pass has finished."""

    @staticmethod
    def forward(ctx, loss: Tensor, callback: Callable[[], None]) -> Tensor:
        ctx.callback = callback
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        torch.autograd.Variable._execution_engine.queue_callback(ctx.callback)
        return grad, None


def on_backward_end(loss: Tensor, callback: Callable[[], None]) -> Tensor:
    """``loss`` unchanged; ``callback`` runs once the backward pass from it has finished (gradients complete)."""
    return _OnBackwardEnd.apply(loss, callback)


def sum_gradients(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """All-reduce (sum) every parameter gradient over the sequence-parallel group."""
    if group_size(group) == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def ce_sum(model: Transformer, h: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of hidden states (B, c, D) against targets (B, c); -100 is ignored."""
    logits = model.head(h).float()  # (B, c, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def default_loss_chunk(local_chunk: int) -> int:
    """LM-head tokens per step: 1/32 of the local chunk as in the reference (vocabularies are wide), >= 128."""
    return min(local_chunk, max(128, local_chunk // 32))


class _ChunkedLMLoss(torch.autograd.Function):
    """Summed cross-entropy of hidden states, chunk by chunk; the backward recomputes each chunk's logits.

    The gradient of h is written chunk by chunk into one buffer, so the peak
    is h, its gradient and one chunk's logits.
    """

    @staticmethod
    def forward(ctx, h: Tensor, model: Transformer, targets: Tensor, chunk: int, store: OffloadStore) -> Tensor:
        ctx.save_for_backward(h, targets)
        ctx.model, ctx.chunk, ctx.store = model, chunk, store
        return sum(ce_sum(model, h[:, s:e], targets[:, s:e]) for s, e in chunk_bounds(h.shape[1], chunk))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        h, targets = ctx.saved_tensors
        dh = torch.empty_like(h)  # (B, T, D)
        with ctx.store.close_on_error(), torch.enable_grad():
            for start, end in chunk_bounds(h.shape[1], ctx.chunk):
                h_c = h[:, start:end].detach().requires_grad_()
                torch.autograd.backward(ce_sum(ctx.model, h_c, targets[:, start:end]), grad)
                dh[:, start:end] = h_c.grad
        return dh, None, None, None, None


def chunked_lm_loss_sum(model: Transformer, h: Tensor, targets: Tensor, chunk: int, store: OffloadStore) -> Tensor:
    """Summed cross-entropy of final hidden states (B, T, D) against targets (B, T), ``chunk`` tokens at a time.

    Each chunk's logits are recomputed in the backward instead of kept, so
    the peak is one (B, chunk, V) block rather than (B, T, V). This backward
    runs first in FPDT's, so if it raises it closes the pipeline's ``store``.
    """
    return _ChunkedLMLoss.apply(h, model, targets, chunk, store)


def pad_to_multiple(tokens: Tensor, targets: Tensor, multiple: int) -> tuple[Tensor, Tensor]:
    """Pad (B, S) tokens/targets at the end to a multiple of ``multiple``; padded targets are ignored.

    Attention is causal, so tokens appended at the end change nothing before them.
    """
    pad = -tokens.shape[1] % multiple
    if pad == 0:
        return tokens, targets
    return F.pad(tokens, (0, pad), value=0), F.pad(targets, (0, pad), value=IGNORE_INDEX)


def fpdt_loss(model: Transformer, tokens: Tensor, targets: Tensor, cfg: FPDTConfig,
              group: dist.ProcessGroup | None = None, on_store: Callable[[OffloadStore], None] | None = None) -> Tensor:
    """Mean next-token cross-entropy of ``model`` on (B, S) ``tokens``/``targets``, computed by FPDT.

    Every rank of ``group`` passes the same full batch and gets the same loss;
    each computes only its share of the tokens. The value and the parameter
    gradients after ``backward()`` equal those of ``lm_loss`` on the plain
    model. ``on_store`` (for tests and benchmarks) sees the step's offload
    store. Targets equal to -100 are ignored.

    The store (and a disk store's spill folder) is closed when the backward
    leaves the first layer, so a failure after that finds nothing open, or as
    soon as the forward, the LM head's or a layer's backward raises. Only an
    error raised before the LM head's backward (say, by a hook on the returned
    loss) leaves the store to be closed when the graph is freed.
    """
    if tokens.dim() != 2 or tokens.shape != targets.shape:
        raise EffdlError(f"tokens and targets must both be (B, S); got {tuple(tokens.shape)} and "
                         f"{tuple(targets.shape)}")
    world, rank = group_size(group), group_rank(group)
    check_sequence_parallel(model, cfg, tokens.shape[1], group)
    tokens, targets = pad_to_multiple(tokens, targets, world)
    B, S = tokens.shape
    index = local_token_index(S, cfg.chunk_size, world, rank).to(tokens.device)  # (S_l,)
    h = model.embed(tokens[:, index])  # (B, S_l, D)
    store = make_store(cfg.offload, cfg.spill_dir,
                       spill_bytes(model.config, B, S, world, h.element_size()) if cfg.offload == "disk" else 0)
    if on_store is not None:
        on_store(store)
    with store.close_on_error():
        pipe = ChunkPipeline(model, cfg, S, group, store, index)
        for i in range(len(model.layers)):
            h = _FPDTBlock.apply(h, pipe, i)
        local_targets = targets[:, index]  # (B, S_l)
        count = (targets != IGNORE_INDEX).sum().clamp_min(1)
        loss_chunk = cfg.loss_chunk or default_loss_chunk(pipe.local_bounds[0][1])
        loss = sum_across_ranks(chunked_lm_loss_sum(model, h, local_targets, loss_chunk, store) / count, group)
    if not loss.requires_grad:
        store.close()
        return loss
    return on_backward_end(loss, lambda: sum_gradients(model, group))
