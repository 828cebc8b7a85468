"""The SPRNet stage of ``effdl demo``: a short run on synthetic shapes, COCO box/mask AP, and an overlay."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from effdl.demo import StageReport
from effdl.report import markdown_table
from effdl.sprnet.evaluate import METRIC_NAMES, draw_overlay, format_metrics, save_overlay
from effdl.sprnet.pretrain import pretrain_backbone, save_backbone
from effdl.sprnet.train import DetectionTrainConfig, load_dataset, load_detector, train_detector


def sprnet_stage(out_dir: Path, quick: bool) -> StageReport:
    """Pretrain the R18 backbone on object crops (about 25 s), train SPRNet on 96-px synthetic shapes for about 70 s,
    score COCO AP and draw one validation image."""
    cfg = DetectionTrainConfig(shapes_train_images=400, shapes_val_images=40, shapes_image_size=96, min_size=96,
                               max_size=96, epochs=3, batch_size=4, warmup_steps=20, max_time_s=70.0,
                               out_dir=str(out_dir / "sprnet"))
    pretrain_steps = 60
    if quick:
        cfg = dataclasses.replace(cfg, shapes_train_images=8, shapes_val_images=4, epochs=1, max_time_s=None)
        pretrain_steps = 2
    state, crop_accuracy = pretrain_backbone(load_dataset(cfg, cfg.train_split), steps=pretrain_steps)
    backbone = save_backbone(state, out_dir / "sprnet" / "backbone-resnet18.pth")
    result = train_detector(dataclasses.replace(cfg, weights_backbone=str(backbone)))
    model, _, names = load_detector(result.checkpoint, device="cpu")
    val = load_dataset(cfg, cfg.val_split)
    image, _ = val[0]
    with torch.inference_mode():
        prediction = model([image])[0]
    overlay = out_dir / "sprnet_overlay.png"
    save_overlay(overlay, draw_overlay(image, prediction, names, score_threshold=0.3))

    ap = format_metrics(result.metrics)
    rows = [("model", f"sprnet_resnet18_fpn, {cfg.shapes_image_size}-px synthetic shapes"),
            ("backbone", f"pretrained {pretrain_steps} steps on object crops ({100 * crop_accuracy:.0f}% accurate)"),
            ("images seen", f"{result.step * cfg.batch_size:,} at {result.images_per_s:,.1f} img/s"),
            *((f"{iou} AP / AP50 ({len(val)} val images)", f"{ap_all} / {ap50}") for iou, ap_all, ap50, *_ in ap)]
    markdown = (markdown_table(["IoU", *METRIC_NAMES], ap) + f"\n![SPRNet overlay]({overlay.name})\n\n"
                "Masks come from one feature vector per detection (its anchor's location), decoded only for the "
                "kept detections. A minute of CPU training gives low AP; `benchmarks/sprnet_vs_maskrcnn.py` "
                "trains longer and compares with Mask R-CNN and RetinaNet.\n")
    headline = ", ".join(f"{iou} AP {ap_all}" for iou, ap_all, *_ in ap) + \
        f" after {result.step * cfg.batch_size:,} images"
    return StageReport("SPRNet: single pixel reconstruction instance segmentation", headline, rows, markdown,
                       [overlay])
