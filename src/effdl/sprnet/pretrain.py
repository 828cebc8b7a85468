"""Backbone pretraining on object crops: the local stand-in for ImageNet weights.

The SPRNet paper, like every torchvision detection recipe, starts from an
ImageNet-pretrained ResNet. Nothing can be downloaded here, and trained from
scratch on a CPU budget the RetinaNet family (SPRNet and its RetinaNet
baseline) localises objects but labels them at chance: a ResNet trained from
scratch has no class information in its deep features at the positions where
a dense head reads them, while Mask R-CNN pools whole boxes from the stride-4
level. ``pretrain_backbone`` gives all three detectors the same starting
point a real user has: a ResNet that already tells the object classes apart,
learned here by classifying the training split's object crops. With real
data, pass ImageNet weights from a local file instead (``weights_backbone``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from effdl.errors import EffdlError
from effdl.sprnet.data import CocoInstances
from effdl.sprnet.model import BACKBONES
from effdl.train.loop import LoopConfig, TrainTask, fit

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's detection transform normalises with these
IMAGENET_STD = (0.229, 0.224, 0.225)


def object_crops(dataset: CocoInstances, size: int = 64, context: float = 1.5,
                 max_crops: int = 20_000) -> tuple[Tensor, Tensor]:
    """Square crops centred on the annotated objects, in dataset order, and their 0-based class indices.

    Each crop's side is ``context`` times its box's longer side, resampled to ``size`` x ``size`` with RoIAlign
    (parts outside the image read as zero). Reading stops after the image that reaches ``max_crops``, which bounds
    memory (20,000 crops of 64 px are about 1 GB) on large datasets such as COCO. Returns images (N, 3, size, size)
    in [0, 1] and labels (N,). Cost: one pass over the images read, N * 3 * size^2 floats of memory.
    """
    crops, labels, count = [], [], 0
    for index in range(len(dataset)):
        if count >= max_crops:
            break
        image, target = dataset[index]
        boxes = target["boxes"]
        if len(boxes) == 0:
            continue
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (G, 2)
        half = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True) * context / 2  # (G, 1)
        crops.append(roi_align(image[None], [torch.cat([centre - half, centre + half], 1)], size, aligned=True))
        labels.append(target["labels"] - 1)
        count += len(boxes)
    if not crops:
        raise EffdlError(f"{dataset.ann_file} has no annotated objects to pretrain a backbone on")
    return torch.cat(crops), torch.cat(labels)


def pretrain_backbone(dataset: CocoInstances, backbone: str = "resnet18", steps: int = 300, batch_size: int = 64,
                      lr: float = 2e-3, crop_size: int = 64, seed: int = 0,
                      progress: bool = True) -> tuple[dict[str, Tensor], float]:
    """Train ``backbone`` as a classifier of ``dataset``'s object crops; return its state dict and training accuracy.

    ``effdl.train``'s loop: AdamW, 10% linear warmup then cosine to zero, label smoothing 0.1 and horizontal
    flips; step n's batch and flips are a function of (seed, n). The state dict is a torchvision ResNet's without
    the classifier (``fc.*``), which ``resnet_fpn(weights_backbone=...)`` loads. The accuracy is measured in eval
    mode on up to 2,048 of the crops after training.
    """
    if backbone not in BACKBONES:
        raise EffdlError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if steps < 1 or batch_size < 1:
        raise EffdlError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    images, labels = object_crops(dataset, crop_size)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    images = (images - mean) / std
    net = BACKBONES[backbone](num_classes=len(dataset.category_names))

    def batch(step: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.randint(len(images), (batch_size,), generator=generator)
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x = images[index]
        return torch.where(flip[:, None, None, None], x.flip(-1), x), labels[index]

    def crop_accuracy() -> dict[str, float]:
        net.eval()
        return {"accuracy": (net(images[:2048]).argmax(1) == labels[:2048]).float().mean().item()}

    task = TrainTask(name=f"pretrain {backbone}", model=net,
                     optimizer=torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05), batch=batch,
                     loss=lambda xy: F.cross_entropy(net(xy[0]), xy[1], label_smoothing=0.1),
                     evaluate=crop_accuracy, trainer="effdl sprnet pretrain", config={},
                     headline=lambda metrics: metrics.get("accuracy"), headline_label="crop acc")
    loop = LoopConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 10), min_lr_ratio=0.0,
                      items_per_step=batch_size)
    result = fit(task, loop, progress=progress)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, result.metrics["accuracy"]


def save_backbone(state: dict[str, Tensor], path: str | Path) -> Path:
    """Write a ``pretrain_backbone`` state dict to ``path`` (folders created), for ``--weights-backbone``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
