"""Image-classification trainer for SOFT and timm baselines on Fashion-MNIST or the generated shapes10.

The recipe is timm's: AdamW (no decay on norms, biases, position embeddings
and class tokens), warmup + cosine per step, label smoothing, gradient
clipping, bf16 autocast on GPUs that support it. Any timm model name works,
so ``--baseline pvt_v2_b0`` trains a softmax model with the same recipe for a
side-by-side. The loop, its schedule and its checkpoints are
``effdl.train``'s; a checkpoint's ``model.safetensors`` loads with
``timm.create_model(..., pretrained=True, pretrained_cfg_overlay={"file": path})``.

Images live on the device as one uint8 tensor; augmentation (random shift by
up to 2 px, horizontal flip) and resizing to ``img_size`` run per batch there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import Tensor, nn

import effdl.soft  # noqa: F401  (registers soft_* with timm)
from effdl.core.data import FASHION_MNIST, IMAGE_SETS, load_images
from effdl.core.device import autocast_for, resolve_device
from effdl.errors import EffdlError
from effdl.train.batches import EpochOrder
from effdl.train.checkpoint import latest_checkpoint, read_trainer_state, read_weights, saved_config
from effdl.train.loop import LoopConfig, TrainResult, TrainTask, fit

TRAINER = "effdl soft train"


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
        if not timm.is_model(self.model):
            raise EffdlError(f"unknown model {self.model!r}: not in timm's registry (soft_tiny ... soft_huge, "
                             "or any timm model such as pvt_v2_b0, deit_tiny_patch16_224)")
        if self.img_size <= 0 or self.epochs <= 0 or self.batch_size <= 0:
            raise EffdlError("img_size, epochs and batch_size must be positive")


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
                     progress: bool = True) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; evaluates on the test split after every epoch and at the end.

    The result's evaluations hold ``{"top1", "loss"}``; with ``resume`` (a checkpoint or run folder) the run
    continues exactly.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train_data, test_data = load_split(cfg, True, device), load_split(cfg, False, device)
    model = create_classifier(cfg.model, cfg.img_size).to(device)
    if resume is not None:
        model.load_state_dict(read_weights(latest_checkpoint(resume), device))
    order = EpochOrder(len(train_data), cfg.batch_size, cfg.seed)
    steps_per_epoch = order.steps_per_epoch

    def batch(step: int) -> tuple[Tensor, Tensor]:
        augment_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        return train_data.batch(order(step).to(device), augment=True, generator=augment_rng)

    task = TrainTask(
        name=cfg.model, model=model,
        optimizer=create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay),
        batch=batch, loss=lambda xy: classification_loss(model, *xy, cfg.label_smoothing),
        evaluate=lambda: evaluate_classifier(model, test_data, device),
        trainer=TRAINER, config=dataclasses.asdict(cfg),
        headline=lambda metrics: metrics.get("top1"), headline_label="top-1")
    loop = LoopConfig(steps=max(1, round(cfg.epochs * steps_per_epoch)), lr=cfg.lr,
                      warmup_steps=round(cfg.warmup_epochs * steps_per_epoch), min_lr_ratio=cfg.min_lr_ratio,
                      grad_clip=cfg.grad_clip, eval_every=steps_per_epoch, checkpoint_every=steps_per_epoch,
                      max_time_s=cfg.max_time_s, out_dir=cfg.out_dir, steps_per_epoch=steps_per_epoch,
                      items_per_step=cfg.batch_size)
    return fit(task, loop, resume=resume, progress=progress)


def load_checkpoint_config(path: str | Path, **overrides: object) -> ImageTrainConfig:
    """The config a checkpoint was trained with, with ``overrides`` (e.g. more ``epochs``) applied."""
    return ImageTrainConfig(**{**saved_config(path, TRAINER), **overrides})


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ImageTrainConfig]:
    """A model saved by ``train_classifier`` (a checkpoint, or a run's newest) and the config it was trained with."""
    state = read_trainer_state(path, TRAINER)
    cfg = ImageTrainConfig(**state["config"])
    model = create_classifier(cfg.model, cfg.img_size).to(device)
    model.load_state_dict(read_weights(state["folder"], device))
    return model.eval(), cfg
