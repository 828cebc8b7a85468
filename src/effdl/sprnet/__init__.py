"""SPRNet: one-stage instance segmentation by single pixel reconstruction, on torchvision's RetinaNet or FCOS.

``model.py`` (SPRNet, SPRFCOS, gated FPN, ResNet- and SOFT-FPN backbones, the baselines by name), ``spr_head.py`` (the
mask branch and its loss), ``data.py`` (COCO-format datasets, synthetic
shapes), ``evaluate.py`` (COCO AP, overlays), ``pretrain.py`` (a backbone from object crops
where ImageNet weights are unavailable), ``train.py`` (train / eval / predict).
"""

from effdl.sprnet.data import CocoInstances, collate, load_image, write_shapes_dataset
from effdl.sprnet.evaluate import coco_results, draw_overlay, evaluate_coco, evaluate_model
from effdl.sprnet.model import (
    DETECTORS,
    SPRFCOS,
    GatedFPN,
    SPRNet,
    build_detector,
    detector_options,
    resnet_fpn,
    soft_fpn,
    sprnet_fcos,
    sprnet_resnet18_fpn,
    sprnet_resnet50_fpn,
)
from effdl.sprnet.pretrain import object_crops, pretrain_backbone, save_backbone
from effdl.sprnet.spr_head import SPRMaskHead, paste_masks

__all__ = [
    "DETECTORS",
    "SPRFCOS",
    "CocoInstances",
    "GatedFPN",
    "SPRMaskHead",
    "SPRNet",
    "build_detector",
    "coco_results",
    "collate",
    "detector_options",
    "draw_overlay",
    "evaluate_coco",
    "evaluate_model",
    "load_image",
    "object_crops",
    "paste_masks",
    "pretrain_backbone",
    "resnet_fpn",
    "save_backbone",
    "soft_fpn",
    "sprnet_fcos",
    "sprnet_resnet18_fpn",
    "sprnet_resnet50_fpn",
    "write_shapes_dataset",
]
