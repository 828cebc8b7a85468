"""The one training loop: every effdl trainer (LM, FPDT, SOFT, SPRNet, backbone pretraining) runs ``fit``.

The loop owns what trainers must agree on: the warmup + cosine schedule,
gradient clipping, autocast, the progress bar, when to evaluate and
checkpoint, the time limit (training stops there, evaluates and saves), a
clear error when the loss stops being finite, and exact resume in the one
checkpoint format of ``effdl.train.checkpoint``. A system brings a
``TrainTask``: its model and optimizer, the batch of each step (a pure
function of seed and step, so resume is exact), its loss and its evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from effdl.core.device import autocast_for
from effdl.errors import EffdlError
from effdl.train.checkpoint import (
    TRAINER_STATE_FILE,
    checkpoint_folder,
    read_trainer_state,
    save_state_dict,
    write_history,
)


@dataclass
class LoopConfig:
    """Schedule, cadence and limits of one run, in optimizer steps."""

    steps: int
    lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping
    eval_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 0  # 0 = only at the end
    max_time_s: float | None = None  # stop after this much training time: evaluate, checkpoint, return
    out_dir: str | Path | None = None  # None = no checkpoints
    steps_per_epoch: int = 0  # > 0: evaluations also record their epoch
    items_per_step: int = 1  # tokens or images, for the throughput


@dataclass
class TrainTask:
    """What a system brings to ``fit``."""

    name: str  # the progress bar's label
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], Any]  # step -> that step's batch, on the device; a pure function of (seed, step)
    loss: Callable[[Any], Tensor]  # batch -> scalar loss (run under autocast)
    evaluate: Callable[[], dict[str, Any]]  # -> metrics; the model is put back in train mode afterwards
    trainer: str  # the command that writes these checkpoints, e.g. "effdl soft train"
    config: dict[str, Any]  # the trainer's config, saved so that a resume can rebuild it
    extra: dict[str, Any] = field(default_factory=dict)  # saved beside it (e.g. the dataset's category names)
    save_weights: Callable[[nn.Module, Path], None] = save_state_dict
    unit: str = "img/s"
    headline: Callable[[dict[str, Any]], float | None] = lambda metrics: None  # the bar's validation column
    headline_label: str = "val"
    status: Callable[[float], str] | None = None  # items/s -> an extra bar column (e.g. peak memory, MFU)


@dataclass
class TrainResult:
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss) of every step
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "train_loss", ["epoch"], "metrics"}
    items_per_s: float = 0.0  # this run's training throughput (tokens/s or images/s)
    checkpoint: Path | None = None  # the last checkpoint written

    @property
    def metrics(self) -> dict[str, Any]:
        """The last evaluation's metrics ({} before any)."""
        return self.evals[-1]["metrics"] if self.evals else {}


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_ratio: float) -> float:
    """Learning rate at 0-based ``step``: linear warmup to ``peak_lr``, then cosine to ``peak_lr * min_ratio``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak_lr * (min_ratio + (1 - min_ratio) * cosine)


def fit(task: TrainTask, loop: LoopConfig, resume: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Train ``task`` to ``loop.steps``; with ``resume`` (a checkpoint or run folder), continue it exactly.

    The system builds ``task.model`` from the checkpoint's weights itself (it knows their format); ``fit``
    restores the optimizer state, the step and the record. Under a process group (sequence parallelism: every
    rank holds the same model) only rank 0 shows progress and writes checkpoints.
    """
    from effdl.progress import TrainProgress

    device = next(task.model.parameters()).device
    result = TrainResult()
    if resume is not None:
        state = read_trainer_state(resume, task.trainer, device)
        task.optimizer.load_state_dict(state["optimizer"])
        result.step, result.evals = state["step"], state["evals"]
        result.losses = [(s, v) for s, v in state["losses"]]
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    started, start_step = time.perf_counter(), result.step
    task.model.train()
    with TrainProgress(loop.steps, start_step, description=task.name, enabled=progress and main_rank,
                       unit=task.unit, val_label=task.headline_label) as bar:
        while result.step < loop.steps:
            step = result.step
            lr = warmup_cosine_lr(step, loop.steps, loop.warmup_steps, loop.lr, loop.min_lr_ratio)
            loss = _optimizer_step(task, task.batch(step), lr, loop.grad_clip, device)
            if not math.isfinite(loss):
                raise EffdlError(f"loss became {loss} at step {step}; lower the learning rate (now {loop.lr:g})")
            result.step = step = step + 1
            result.losses.append((step, loss))
            elapsed = time.perf_counter() - started
            result.items_per_s = (step - start_step) * loop.items_per_step / elapsed
            last = step == loop.steps or (loop.max_time_s is not None and elapsed >= loop.max_time_s)
            if last or (loop.eval_every and step % loop.eval_every == 0):
                result.evals.append(_evaluate(task, step, loss, loop.steps_per_epoch))
            if main_rank and loop.out_dir is not None and (
                    last or (loop.checkpoint_every and step % loop.checkpoint_every == 0)):
                result.checkpoint = _save(task, result, Path(loop.out_dir))
            bar.update(step, loss, result.items_per_s, task.headline(result.metrics),
                       task.status(result.items_per_s) if task.status else "")
            if last:
                break
    return result


def _optimizer_step(task: TrainTask, batch: Any, lr: float, grad_clip: float, device: torch.device) -> float:
    """One update at learning rate ``lr``: loss under autocast, backward, clipping, step; returns the loss."""
    for group in task.optimizer.param_groups:  # a group may run at a multiple of the schedule (a new head, say)
        group["lr"] = lr * group.get("lr_scale", 1.0)
    with autocast_for(device):
        loss = task.loss(batch)
    task.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(task.model.parameters(), grad_clip)
    task.optimizer.step()
    return loss.item()


def _evaluate(task: TrainTask, step: int, train_loss: float, steps_per_epoch: int) -> dict[str, Any]:
    with torch.no_grad():
        metrics = task.evaluate()
    task.model.train()
    epoch = {"epoch": step / steps_per_epoch} if steps_per_epoch else {}
    return {"step": step, **epoch, "train_loss": train_loss, "metrics": metrics}


def _save(task: TrainTask, result: TrainResult, out_dir: Path) -> Path:
    folder = checkpoint_folder(out_dir, result.step)
    folder.mkdir(parents=True, exist_ok=True)
    task.save_weights(task.model, folder)
    torch.save({"trainer": task.trainer, "step": result.step, "optimizer": task.optimizer.state_dict(),
                "config": task.config, "losses": result.losses, "evals": result.evals, **task.extra},
               folder / TRAINER_STATE_FILE)
    write_history(out_dir, result.losses, result.evals)
    return folder
