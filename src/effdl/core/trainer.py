"""Language-model trainer on the embedded corpus.

AdamW with linear warmup and cosine decay, gradient clipping, bf16 autocast
where the device supports it, periodic evaluation, and checkpoints in HF
format that resume exactly: the batch of step n is a pure function of the
seed and n, and optimizer state is saved beside the weights.

Systems that change how the loss is computed (FPDT's chunked pipeline) pass
their own ``loss_fn``; everything else here is shared.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from effdl.core.config import ModelConfig
from effdl.core.data import TokenBatches, corpus_tokens
from effdl.core.device import resolve_device
from effdl.core.hf import load_checkpoint, save_checkpoint
from effdl.core.tokenizer import ByteTokenizer
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError

TRAINER_STATE_FILE = "trainer_state.pt"
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
    max_time_s: float | None = None  # stop early (and checkpoint) after this much wall time

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "steps", "eval_batches"):
            if getattr(self, name) <= 0:
                raise EffdlError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise EffdlError(f"lr must be positive, got {self.lr}")


@dataclass
class TrainResult:
    step: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss)
    tokens_per_s: float = 0.0
    checkpoint: Path | None = None


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


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_ratio: float) -> float:
    """Learning rate at 0-based ``step``: linear warmup to ``peak_lr``, then cosine to ``peak_lr * min_ratio``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak_lr * (min_ratio + (1 - min_ratio) * cosine)


def lr_at(step: int, cfg: TrainConfig) -> float:
    return warmup_cosine_lr(step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, compute_loss: Callable[[], Tensor], lr: float,
               grad_clip: float, device: torch.device) -> Tensor:
    """One optimizer step at learning rate ``lr``: loss under autocast, backward, clipping, update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast_for(device):
        loss = compute_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device,
             loss_fn: LossFn = lm_loss) -> float:
    was_training = model.training
    model.eval()
    with autocast_for(device):
        losses = [loss_fn(model, x.to(device), y.to(device)).item() for x, y in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def train(cfg: TrainConfig, model: Transformer | None = None, loss_fn: LossFn = lm_loss,
          resume: str | Path | None = None, progress: bool = True,
          status: Callable[[float], str] | None = None) -> TrainResult:
    """Train ``model`` (default: a fresh ``cfg.preset`` model) on the stdlib corpus.

    With ``resume``, weights, optimizer state and step come from that
    checkpoint folder (or the newest ``checkpoint-*`` inside it) and training
    continues to ``cfg.steps``. ``status(tokens_per_s)`` adds a column to the
    progress bar. Under a process group (sequence parallelism, where every
    rank holds the same model) only rank 0 shows progress and writes
    checkpoints.
    """
    from effdl.progress import TrainProgress

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    start_step, history = 0, TrainResult(step=0)
    if resume is not None:
        ckpt = latest_checkpoint(resume)
        model = load_checkpoint(ckpt, device=device, dtype=torch.float32)
        state = torch.load(ckpt / TRAINER_STATE_FILE, map_location=device, weights_only=True)
        start_step = state["step"]
        history.losses = [tuple(x) for x in state["losses"]]
        history.evals = [tuple(x) for x in state["evals"]]
    elif model is None:
        model = Transformer(ModelConfig.preset(cfg.preset), device=device)
    model = model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    if resume is not None:
        optimizer.load_state_dict(state["optimizer"])

    train_batches = TokenBatches(corpus_tokens("train"), cfg.batch_size, cfg.seq_len, cfg.seed)
    val_batches = TokenBatches(corpus_tokens("val"), cfg.batch_size, cfg.seq_len).fixed(cfg.eval_batches)
    out_dir = Path(cfg.out_dir)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    started, step = time.perf_counter(), start_step
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    with TrainProgress(cfg.steps, start_step, enabled=progress and main_rank) as bar:
        while step < cfg.steps:
            inputs, targets = (t.to(device) for t in train_batches.batch(step))
            loss = train_step(model, optimizer, partial(loss_fn, model, inputs, targets), lr_at(step, cfg),
                              cfg.grad_clip, device)
            step += 1
            history.losses.append((step, loss.item()))
            elapsed = time.perf_counter() - started
            history.tokens_per_s = (step - start_step) * tokens_per_step / elapsed
            out_of_time = cfg.max_time_s is not None and elapsed >= cfg.max_time_s
            last = step == cfg.steps or out_of_time
            if last or (cfg.eval_every and step % cfg.eval_every == 0):
                history.evals.append((step, evaluate(model, val_batches, device, loss_fn)))
            bar.update(step, history.losses[-1][1], history.tokens_per_s,
                       history.evals[-1][1] if history.evals else None,
                       status(history.tokens_per_s) if status else "")
            if main_rank and (last or (cfg.ckpt_every and step % cfg.ckpt_every == 0)):
                history.checkpoint = save_training_checkpoint(model, optimizer, cfg, history, step, out_dir)
            if out_of_time:
                break
    history.step = step
    return history


def save_training_checkpoint(model: Transformer, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                             history: TrainResult, step: int, out_dir: Path) -> Path:
    """HF-format weights + tokenizer, plus what exact resumption needs (optimizer state, step, history)."""
    folder = save_checkpoint(model, out_dir / f"checkpoint-{step:06d}", tokenizer=ByteTokenizer())
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "losses": history.losses,
        "evals": history.evals,
        "train_config": dataclasses.asdict(cfg),
    }
    torch.save(state, folder / TRAINER_STATE_FILE)
    (out_dir / "history.json").write_text(json.dumps({"losses": history.losses, "evals": history.evals}))
    return folder


def resume_config(path: str | Path, **overrides: object) -> TrainConfig:
    """The ``TrainConfig`` a checkpoint was trained with, with ``overrides`` (e.g. more ``steps``) applied."""
    state = torch.load(latest_checkpoint(path) / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
    return TrainConfig(**{**state["train_config"], **overrides})


def latest_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a training checkpoint, else its newest ``checkpoint-*`` folder."""
    path = Path(path)
    if (path / TRAINER_STATE_FILE).is_file():
        return path
    candidates = sorted(p for p in path.glob("checkpoint-*") if (p / TRAINER_STATE_FILE).is_file())
    if not candidates:
        raise EffdlError(f"{path} is not a training checkpoint and holds no checkpoint-* folder to resume from")
    return candidates[-1]


def autocast_for(device: torch.device) -> torch.autocast:
    """bf16 autocast on GPUs that support it; fp32 elsewhere (CPU bf16 matmuls are slower on most CPUs)."""
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
