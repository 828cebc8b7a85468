"""``effdl fpdt train`` and the long-context evaluation: the core trainer with FPDT's loss, and loss by position.

Training reuses ``effdl.train.lm`` (AdamW, warmup + cosine, clipping,
HF-format checkpoints, exact resume); FPDT only changes how the loss and its
gradients are computed. Under torchrun every rank builds the same model from
the same seed and reads the same batch; each computes its share of the
sequence and the gradients are summed across ranks by ``fpdt_loss``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from effdl.core.config import ModelConfig
from effdl.core.data import corpus_tokens
from effdl.core.device import resolve_device
from effdl.core.hf import load_checkpoint, load_config
from effdl.core.transformer import Transformer
from effdl.distributed import process_group
from effdl.errors import EffdlError
from effdl.fpdt.measure import MiB, gemm_flops, peak_rss_bytes, release_large_frees, train_flops_per_token
from effdl.fpdt.pipeline import FPDTConfig, fpdt_loss
from effdl.train.checkpoint import latest_checkpoint
from effdl.train.lm import TrainConfig, train
from effdl.train.loop import TrainResult


def train_fpdt(cfg: TrainConfig, fpdt: FPDTConfig, resume: str | Path | None = None, init: str | Path | None = None,
               progress: bool = True) -> TrainResult:
    """Train at ``cfg.seq_len`` tokens with FPDT; ``fpdt.sp_size`` must match torchrun's world.

    The model is a fresh ``cfg.preset``, or the HF-format checkpoint folder ``init`` (e.g. a Llama to extend
    to longer contexts), or what ``resume`` continues.
    """
    with process_group() as (_, world, device):
        if fpdt.sp_size != world:
            raise EffdlError(f"--sp {fpdt.sp_size} but {world} process(es) were launched; run "
                             f"torchrun --nproc-per-node {fpdt.sp_size} -m effdl.cli fpdt train ...")
        if cfg.device != "auto":
            device = resolve_device(cfg.device)
        release_large_frees()
        model = None
        if init is not None and resume is None:
            model = load_checkpoint(init, device=device, dtype=torch.float32)
        elif resume is None:
            torch.manual_seed(cfg.seed)
            model = Transformer(ModelConfig.preset(cfg.preset, max_seq_len=cfg.seq_len), device=device)
        # Read once here: a missing checkpoint fails before training, and the status column does no I/O per step.
        flops_per_token = train_flops_per_token(
            model.config if model is not None else load_config(latest_checkpoint(resume)), cfg.seq_len)
        peak_flops = gemm_flops(device=device)

        def status(tokens_per_s: float) -> str:
            mfu = tokens_per_s / world * flops_per_token / peak_flops
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
            return f"peak {peak / MiB:,.0f} MiB  MFU {100 * mfu:.1f}%"

        return train(cfg, model, lambda m, x, y: fpdt_loss(m, x, y, fpdt), resume=resume, progress=progress,
                     status=status)


def bucket_means(curve: Tensor, edges: list[int]) -> list[float]:
    """Mean of ``curve`` over each [edges[i], edges[i + 1]) bucket of positions."""
    return [curve[a:b].mean().item() for a, b in itertools.pairwise(edges)]


def position_buckets(curve: Tensor) -> list[tuple[int, int, float]]:
    """``(first, end, mean loss)`` of a per-position loss ``curve`` (S,) over log-spaced buckets [0, 16), [16, 32),
    [32, 64) ... [., S): fine where the loss falls fastest (early positions), coarse where it flattens."""
    seq_len = curve.numel()
    edges = [0] + [2**k for k in range(4, seq_len.bit_length()) if 2**k < seq_len] + [seq_len]
    return [(a, b, m) for (a, b), m in zip(itertools.pairwise(edges), bucket_means(curve, edges), strict=True)]


@torch.no_grad()
def loss_by_position(model: Transformer, seq_len: int, windows: int = 4, split: str = "val") -> Tensor:
    """Mean next-token loss (seq_len,) at each position over ``windows`` held-out windows of ``seq_len`` tokens.

    If the model uses its context, the curve falls with position: later
    tokens see more of the file they belong to. Evaluation keeps no graph,
    so a plain forward suffices (SDPA's memory is linear in the length and
    the (S, V) logits are the largest tensor). Cost: ``windows`` forwards.
    """
    tokens = corpus_tokens(split)
    needed = windows * (seq_len + 1)
    if tokens.numel() < needed:
        raise EffdlError(f"the {split} corpus has {tokens.numel():,} tokens; {windows} windows of {seq_len:,} "
                         f"need {needed:,}")
    device = next(model.parameters()).device
    total = torch.zeros(seq_len, dtype=torch.float64)
    stride = (tokens.numel() - seq_len - 1) // max(1, windows - 1) if windows > 1 else 0
    was_training = model.training
    model.eval()
    for w in range(windows):
        window = tokens[w * stride: w * stride + seq_len + 1].long().to(device)[None]  # (1, S + 1)
        logits = model(window[:, :-1]).float()  # (1, S, V)
        total += F.cross_entropy(logits[0], window[0, 1:], reduction="none").double().cpu()
    model.train(was_training)
    return (total / windows).float()
