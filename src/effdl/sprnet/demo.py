"""The SPRNet stage of ``effdl demo``: a short run on synthetic shapes, COCO box/mask AP, and an overlay."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from effdl.report import PALETTE, BoxedImage, boxed_images, markdown_table
from effdl.sprnet.evaluate import METRIC_NAMES, format_metrics
from effdl.sprnet.pretrain import pretrain_backbone, save_backbone
from effdl.sprnet.train import DetectionTrainConfig, load_dataset, load_detector, train_detector
from effdl.stage import StageReport


def sprnet_stage(out_dir: Path, quick: bool) -> StageReport:
    """Pretrain the R18 backbone on object crops for 40 steps, train SPRNet (SPR on FCOS, the variant that learns
    fastest on the plateau benchmark) on 96-px synthetic shapes for 55 s, score COCO AP and draw one validation
    image."""
    cfg = DetectionTrainConfig(model="sprnet_fcos_resnet18_fpn", shapes_train_images=400, shapes_val_images=40,
                               shapes_image_size=96, min_size=96,
                               max_size=96, epochs=3, batch_size=4, warmup_steps=20, max_time_s=55.0,
                               out_dir=str(out_dir / "sprnet"))
    pretrain_steps = 40
    if quick:
        cfg = dataclasses.replace(cfg, shapes_train_images=8, shapes_val_images=4, epochs=1, max_time_s=None)
        pretrain_steps = 2
    state, crop_accuracy = pretrain_backbone(load_dataset(cfg, cfg.train_split), steps=pretrain_steps)
    backbone = save_backbone(state, out_dir / "sprnet" / "backbone-resnet18.pth")
    result = train_detector(dataclasses.replace(cfg, weights_backbone=str(backbone)))
    model, _, names = load_detector(result.checkpoint, device="cpu")
    val = load_dataset(cfg, cfg.val_split)
    # The first validation image with two or more shapes: one with none or one shows little.
    samples = (val[i] for i in range(len(val)))
    image, target = next((sample for sample in samples if len(sample[1]["labels"]) >= 2), val[0])
    with torch.inference_mode():
        prediction = model([image])[0]
    overlay = boxed_images(out_dir / "sprnet_overlay.png", overlay_panels(image, prediction, target, names),
                           title=f"SPRNet on a {image.shape[-1]}-px validation image, shown enlarged")

    ap = format_metrics(result.metrics)
    rows = [("model", f"{cfg.model}, {cfg.shapes_image_size}-px synthetic shapes"),
            ("backbone", f"pretrained {pretrain_steps} steps on object crops ({100 * crop_accuracy:.0f}% accurate)"),
            ("images seen", f"{result.step * cfg.batch_size:,} at {result.items_per_s:,.1f} img/s"),
            *((f"{iou} AP / AP50 ({len(val)} val images)", f"{ap_all} / {ap50}") for iou, ap_all, ap50, *_ in ap)]
    markdown = (markdown_table(["IoU", *METRIC_NAMES], ap) + f"\n![SPRNet overlay]({overlay.name})\n\n"
                "Masks come from one feature vector per detection (its FCOS location) plus the finest FPN "
                "level's logits inside its box, decoded only for the kept detections. A minute of CPU training "
                "gives a weak model: loose, duplicate boxes and blob-like masks, as in the overlay. "
                "`benchmarks/sprnet_vs_maskrcnn.py` trains for 20 epochs and compares with Mask R-CNN and "
                "RetinaNet.\n")
    headline = ", ".join(f"{iou} AP {ap_all}" for iou, ap_all, *_ in ap) + \
        f" after {result.step * cfg.batch_size:,} images"
    return StageReport("SPRNet: single pixel reconstruction instance segmentation", headline, rows, markdown,
                       [overlay])


def overlay_panels(image: Tensor, prediction: dict[str, Tensor], target: dict[str, Tensor], names: Sequence[str],
                   score_threshold: float = 0.3, short_side: int = 512, max_shown: int = 6) -> list[BoxedImage]:
    """Prediction beside ground truth for ``boxed_images``: the float [3, H, W] image enlarged by a whole factor to
    at least ``short_side`` px, masks enlarged with it, one colour per class in both panels. The prediction panel
    has the detections scoring above ``score_threshold`` (the ``max_shown`` best of them, so a short run's many
    overlapping guesses do not hide the image), or the 3 best where none does."""
    scale = math.ceil(short_side / min(image.shape[-2:]))
    enlarged = F.interpolate(image[None].float(), scale_factor=scale, mode="bilinear", align_corners=False)[0]
    enlarged = (enlarged.clamp(0, 1) * 255).round().to(torch.uint8)  # (3, H * scale, W * scale)
    keep = (prediction["scores"] > score_threshold).nonzero()[:, 0]
    shown = f"prediction, score > {score_threshold:g}: {len(keep)} shapes"
    if len(keep) > max_shown:
        keep = keep[prediction["scores"][keep].argsort(descending=True)[:max_shown]]
        shown += f", best {max_shown} shown"
    if not len(keep):
        keep = prediction["scores"].argsort(descending=True)[:3]
        shown = f"prediction: none scores > {score_threshold:g}, best {len(keep)} shown"
    panels = []
    for title, boxes, labels, masks, scores in (
            (shown, prediction["boxes"][keep], prediction["labels"][keep],
             prediction["masks"][keep, 0], prediction["scores"][keep].tolist()),
            (f"ground truth: {len(target['labels'])} shapes", target["boxes"], target["labels"],
             target["masks"].float(), None)):
        colors = [PALETTE[(label - 1) % len(PALETTE)] for label in labels.tolist()]
        # Bilinear on the mask, then the threshold: smooth edges at the enlarged size, not 'scale'-px steps.
        sharp = F.interpolate(masks[:, None].float(), scale_factor=scale, mode="bilinear")[:, 0] > 0.5
        captions = [names[label - 1] + (f" {scores[i]:.2f}" if scores is not None else "")
                    for i, label in enumerate(labels.tolist())]
        panels.append(BoxedImage(title, enlarged.permute(1, 2, 0).numpy(),
                                 (boxes * scale).tolist(), captions, colors, list(sharp.numpy())))
    return panels
