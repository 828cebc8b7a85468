"""Image-classification trainer for SOFT and timm baselines on Fashion-MNIST or the generated shapes10.

The recipe is timm's: AdamW (no decay on norms, biases, position embeddings
and class tokens), warmup + cosine per step, label smoothing, gradient
clipping, bf16 autocast on GPUs that support it. Any timm model name works,
so ``--baseline pvt_v2_b0`` trains a softmax model with the same recipe for a
side-by-side. Checkpoints hold ``{"model", "optimizer", "epoch", "config",
"history"}``; their ``model`` entry loads with ``timm.create_model(...,
pretrained=True, pretrained_cfg_overlay={"file": path})``.

Images live on the device as one uint8 tensor; augmentation (random shift by
up to 2 px, horizontal flip) and resizing to ``img_size`` run per batch there.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import Tensor, nn

import effdl.soft  # noqa: F401  (registers soft_* with timm)
from effdl.core.data import FASHION_MNIST, IMAGE_SETS, load_images
from effdl.core.device import resolve_device
from effdl.core.run_checkpoint import epoch_batches, epoch_steps, read_run_checkpoint, restore_run, save_run_checkpoint
from effdl.core.trainer import autocast_for, train_step, warmup_cosine_lr
from effdl.errors import EffdlError


@dataclass
class ImageTrainConfig:
    model: str = "soft_tiny"
    data: str = FASHION_MNIST  # or "shapes10", generated here (core.data), for machines without Fashion-MNIST
    img_size: int = 64
    epochs: float = 10.0  # fractional epochs allowed, for short runs
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    train_subset: int = 0  # 0 = all 60,000 training images (both sets)
    eval_subset: int = 0  # 0 = all 10,000 test images
    out_dir: str = "runs/soft"
    seed: int = 0
    device: str = "auto"
    max_time_s: float | None = None

    def __post_init__(self) -> None:
        if self.data not in IMAGE_SETS:
            raise EffdlError(f"unknown dataset {self.data!r}; available: {', '.join(IMAGE_SETS)}")
        if self.model not in timm.list_models():
            raise EffdlError(f"unknown model {self.model!r}: not in timm's registry (soft_tiny ... soft_huge, "
                             "or any timm model such as pvt_v2_b0, deit_tiny_patch16_224)")
        if self.img_size <= 0 or self.epochs <= 0 or self.batch_size <= 0:
            raise EffdlError("img_size, epochs and batch_size must be positive")


@dataclass
class ImageTrainResult:
    step: int
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss) of every step
    images_per_s: float = 0.0
    checkpoint: Path | None = None

    @property
    def top1(self) -> float:
        return self.history[-1]["top1"]


class DeviceImages:
    """A whole image dataset as one uint8 tensor on the device, batched, augmented and resized there."""

    def __init__(self, images: Tensor, labels: Tensor, img_size: int, device: torch.device,
                 mean_std: tuple[float, float]):
        self.images = images.to(device)  # (N, 28, 28) uint8
        self.labels = labels.to(device)  # (N,)
        self.img_size = img_size
        self.mean, self.std = mean_std

    def __len__(self) -> int:
        return self.labels.numel()

    def batch(self, index: Tensor, augment: bool, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        x = self.images[index].float().div_(255)[:, None]  # (B, 1, 28, 28)
        if augment:
            B = x.shape[0]
            padded = F.pad(x, (2, 2, 2, 2), mode="reflect")  # (B, 1, 32, 32)
            dy, dx = torch.randint(0, 5, (2, B), generator=generator).tolist()
            x = torch.stack([padded[i, :, y:y + 28, z:z + 28] for i, (y, z) in enumerate(zip(dy, dx, strict=True))])
            flip = torch.rand(B, generator=generator) < 0.5
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        x = F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False, antialias=False)
        return (x - self.mean) / self.std, self.labels[index]


def load_split(cfg: ImageTrainConfig, train: bool, device: torch.device) -> DeviceImages:
    split = load_images(cfg.data, train, cfg.train_subset if train else cfg.eval_subset)
    return DeviceImages(split.images, split.labels, cfg.img_size, device, split.mean_std)


def create_classifier(name: str, img_size: int, num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """A timm model for ``img_size`` inputs; models with a fixed patch grid get ``img_size``, others ignore it."""
    try:
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    except TypeError:  # size-agnostic models (PVT v2, ResNets) take no img_size argument
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans)


def classification_loss(model: nn.Module, x: Tensor, y: Tensor, label_smoothing: float) -> Tensor:
    return F.cross_entropy(model(x).float(), y, label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: DeviceImages, device: torch.device,
                        batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy on ``data``."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for index in torch.arange(len(data), device=device).split(batch_size):
        x, y = data.batch(index, augment=False)
        with autocast_for(device):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return {"top1": 100.0 * correct / len(data), "loss": loss_sum / len(data)}


def train_classifier(cfg: ImageTrainConfig, resume: str | Path | None = None,
                     progress: bool = True) -> ImageTrainResult:
    """Train ``cfg.model`` on ``cfg.data``; evaluates on the test split after every epoch and at the end."""
    from effdl.progress import TrainProgress

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train_data, test_data = load_split(cfg, True, device), load_split(cfg, False, device)
    model = create_classifier(cfg.model, cfg.img_size).to(device)
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = epoch_steps(len(train_data), cfg.batch_size)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    result, step = ImageTrainResult(step=0), 0
    if resume is not None:
        step, result.history, result.losses = restore_run(read_checkpoint(resume, device), model, optimizer)

    started, start_step = time.perf_counter(), step
    batches = epoch_batches(len(train_data), cfg.batch_size, cfg.seed, step)
    with TrainProgress(total_steps, step, description=cfg.model, enabled=progress, unit="img/s",
                       val_label="top-1") as bar:
        model.train()
        while step < total_steps:
            index = next(batches).to(device)
            augment_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            x, y = train_data.batch(index, augment=True, generator=augment_rng)
            lr = warmup_cosine_lr(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr_ratio)
            loss = train_step(model, optimizer, partial(classification_loss, model, x, y, cfg.label_smoothing), lr,
                              cfg.grad_clip, device)
            step += 1
            result.losses.append((step, loss.item()))
            elapsed = time.perf_counter() - started
            result.images_per_s = (step - start_step) * cfg.batch_size / elapsed
            if cfg.max_time_s is not None and elapsed >= cfg.max_time_s:
                total_steps = step
            if step % steps_per_epoch == 0 or step == total_steps:
                metrics = evaluate_classifier(model, test_data, device)
                result.history.append({"step": step, "epoch": step / steps_per_epoch,
                                       "train_loss": result.losses[-1][1], **metrics})
                result.checkpoint = save_run_checkpoint(cfg.out_dir, cfg.model, step, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "config": dataclasses.asdict(cfg), "history": result.history, "losses": result.losses})
            bar.update(step, result.losses[-1][1], result.images_per_s,
                       result.history[-1]["top1"] if result.history else None)
    result.step = step
    return result


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint of ``train_classifier``: a .pth file or a run folder (its newest)."""
    return read_run_checkpoint(path, {"model", "config", "optimizer"}, "effdl soft train", device)


def load_checkpoint_config(path: str | Path, **overrides: object) -> ImageTrainConfig:
    """The config a checkpoint was trained with, with ``overrides`` (e.g. more ``epochs``) applied."""
    return ImageTrainConfig(**{**read_checkpoint(path)["config"], **overrides})


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ImageTrainConfig]:
    """A model saved by ``train_classifier`` and the config it was trained with."""
    state = read_checkpoint(path, device)
    cfg = ImageTrainConfig(**state["config"])
    model = create_classifier(cfg.model, cfg.img_size).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), cfg
