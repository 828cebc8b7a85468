"""Language-model trainer on the embedded corpus: ``effdl lm train``, and FPDT's with its own loss.

AdamW (decay on matrices only) with linear warmup and cosine decay,
gradient clipping, bf16 autocast where the device supports it, periodic
evaluation on held-out windows, and checkpoints whose weights are an HF
folder (``effdl lm generate``, ``effdl flover serve`` and ``transformers``
load them) and that resume exactly: the batch of step n is a pure function
of the seed and n. The loop itself is ``effdl.train.loop.fit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effdl.core.config import ModelConfig
from effdl.core.data import TokenBatches, corpus_tokens
from effdl.core.device import autocast_for, resolve_device
from effdl.core.hf import load_checkpoint, save_checkpoint
from effdl.core.tokenizer import ByteTokenizer
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError
from effdl.train.checkpoint import latest_checkpoint, saved_config
from effdl.train.loop import LoopConfig, TrainResult, TrainTask, fit

TRAINER = "effdl lm train"
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class TrainConfig:
    preset: str = "tiny"
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50  # 0 = only at the end
    eval_batches: int = 8
    ckpt_every: int = 0  # 0 = only at the end
    out_dir: str = "runs/lm"
    seed: int = 0
    device: str = "auto"
    max_time_s: float | None = None  # stop early (evaluate and checkpoint) after this much wall time

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "steps", "eval_batches"):
            if getattr(self, name) <= 0:
                raise EffdlError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise EffdlError(f"lr must be positive, got {self.lr}")


def lm_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy; logits (B, T, V) upcast to fp32 for the softmax.

    MoE models in training mode add their load-balancing loss, weighted by
    ``config.router_aux_coef``; evaluation reports the cross-entropy alone.
    """
    logits = model(inputs)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    if model.training and model.config.is_moe:
        loss = loss + model.config.router_aux_coef * model.balance_loss()
    return loss


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[Tensor, Tensor]], loss_fn: LossFn = lm_loss) -> float:
    """Mean ``loss_fn`` over ``batches`` in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with autocast_for(device):
        losses = [loss_fn(model, x.to(device), y.to(device)).item() for x, y in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def train(cfg: TrainConfig, model: Transformer | None = None, loss_fn: LossFn = lm_loss,
          resume: str | Path | None = None, progress: bool = True,
          status: Callable[[float], str] | None = None) -> TrainResult:
    """Train ``model`` (default: a fresh ``cfg.preset`` model) on the stdlib corpus.

    With ``resume``, weights come from that checkpoint folder (or the newest ``checkpoint-*`` inside it) and
    training continues to ``cfg.steps``. ``status(tokens_per_s)`` adds a column to the progress bar. The result's
    evaluations hold ``{"val_loss": ...}``.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if resume is not None:
        model = load_checkpoint(latest_checkpoint(resume), device=device, dtype=torch.float32)
    elif model is None:
        model = Transformer(ModelConfig.preset(cfg.preset), device=device)
    model = model.to(device)
    train_batches = TokenBatches(corpus_tokens("train"), cfg.batch_size, cfg.seq_len, cfg.seed)
    val_batches = TokenBatches(corpus_tokens("val"), cfg.batch_size, cfg.seq_len).fixed(cfg.eval_batches)
    task = TrainTask(
        name="train", model=model, optimizer=make_optimizer(model, cfg),
        batch=lambda step: tuple(t.to(device) for t in train_batches.batch(step)),
        loss=lambda batch: loss_fn(model, *batch),
        evaluate=lambda: {"val_loss": evaluate(model, val_batches, loss_fn)},
        trainer=TRAINER, config=dataclasses.asdict(cfg),
        save_weights=lambda m, folder: save_checkpoint(m, folder, tokenizer=ByteTokenizer()),
        unit="tok/s", headline=lambda metrics: metrics.get("val_loss"), status=status)
    loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio,
                      grad_clip=cfg.grad_clip, eval_every=cfg.eval_every, checkpoint_every=cfg.ckpt_every,
                      max_time_s=cfg.max_time_s, out_dir=cfg.out_dir, items_per_step=cfg.batch_size * cfg.seq_len)
    return fit(task, loop, resume=resume, progress=progress)


def resume_config(path: str | Path, **overrides: object) -> TrainConfig:
    """The ``TrainConfig`` a checkpoint was trained with, with ``overrides`` (e.g. more ``steps``) applied."""
    return TrainConfig(**{**saved_config(path, TRAINER), **overrides})
