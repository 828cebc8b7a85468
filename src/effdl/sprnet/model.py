"""SPRNet: single pixel reconstruction for one-stage instance segmentation (Yu et al., IEEE T-Cybernetics).

RetinaNet (torchvision: anchors, matcher, focal loss, box coder, transform)
with two additions: a mask branch that reconstructs each detection's
32 x 32 mask from the single feature vector at the location of the anchor
that produced it (``spr_head.py``), and an optional gated FPN. The model
speaks torchvision's detection protocol: ``model(images, targets)`` returns
a loss dict in train mode, ``model(images)`` returns per-image dicts with
``boxes, labels, scores, masks (N, 1, H, W)`` in eval mode, exactly like
Mask R-CNN.

The paper attaches SPR to "off-the-shelf one-stage detectors"; ``SPRFCOS``
attaches it to torchvision's FCOS (centre-sampling assignment, centerness,
GIoU), and both share ``SPRMixin``: mask loss, score-capped mask decoding,
pasting, mask scoring and box refinement.

``build_detector(name, num_classes)`` builds SPRNet (``sprnet_*``, on
RetinaNet as in the paper, and ``sprnet_fcos_*``) and the two baselines it is
measured against (torchvision Mask R-CNN and RetinaNet) on the same
backbone: a torchvision ResNet or a SOFT vision transformer (``effdl.soft``,
through timm's feature API), both under the same FPN (``FPNBackbone``).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork, batched_nms, box_iou, clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from effdl.errors import EffdlError
from effdl.soft.model import MODEL_ARGS as SOFT_MODELS  # importing effdl.soft registers the SOFT models with timm
from effdl.soft.model import STRIDE as SOFT_STRIDE
from effdl.sprnet.spr_head import (
    DILATIONS,
    MASK_SIZE,
    LocalMaskLogits,
    SPRMaskHead,
    mask_boxes,
    mask_frames,
    mask_positives,
    mask_targets,
    maskness,
    paired_box_iou,
    paste_masks,
    scale_boxes,
    spr_mask_loss,
)

Targets = list[dict[str, Tensor]]
Positives = tuple[Tensor, Tensor, Tensor]  # mask positives: (location, ground-truth index, box the mask is learnt in)


class GatedFPN(FeaturePyramidNetwork):
    """FPN whose top-down sums weigh each input by a sigmoid gate: ``g(lateral) * lateral + g(top_down) * top_down``.

    The gate is one shared separable conv (3x3 depthwise, 1x1 pointwise) with a
    sigmoid, giving a per-position, per-channel weight in (0, 1). Its bias
    starts at +2 (gate ~0.88) so training begins close to a plain FPN.
    """

    def __init__(self, in_channels_list: list[int], out_channels: int, extra_blocks: ExtraFPNBlock | None = None):
        super().__init__(in_channels_list, out_channels, extra_blocks)
        self.gate = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels),
                                  nn.Conv2d(out_channels, out_channels, 1), nn.Sigmoid())
        nn.init.constant_(self.gate[1].bias, 2.0)

    def _gated(self, x: Tensor) -> Tensor:
        return self.gate(x) * x

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        names, inputs = list(x), list(x.values())
        last_inner = self.get_result_from_inner_blocks(inputs[-1], -1)
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(inputs) - 2, -1, -1):
            lateral = self.get_result_from_inner_blocks(inputs[idx], idx)
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = self._gated(lateral) + self._gated(top_down)
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, inputs, names)
        return OrderedDict(zip(names, results, strict=True))


def select_detections(probabilities: list[Tensor], regression: list[Tensor], anchors: list[list[Tensor]],
                      image_shapes: list[tuple[int, int]], decode: Callable[[Tensor, Tensor], Tensor],
                      score_thresh: float, topk_candidates: int, nms_thresh: float,
                      detections_per_img: int) -> Targets:
    """One-stage post-processing (score threshold, top-k per level, decode, class-wise NMS, top-N) that also
    returns each kept detection's index into the image's full anchor list (``anchor_idx``), which torchvision drops.

    ``probabilities`` (B, L_l*A, K) and ``regression`` (B, L_l*A, 4) per level, ``anchors`` per image and level,
    ``decode(regression, anchors) -> boxes``. Column 0 is background (labels run 1..K-1, as in Mask R-CNN), so it is
    never a detection; torchvision's one-stage models score it like any class.
    """
    detections = []
    for index, image_shape in enumerate(image_shapes):
        boxes, scores, labels, anchor_ids = [], [], [], []
        offset = 0
        for level_probabilities, level_regression, level_anchors in zip(probabilities, regression, anchors[index],
                                                                        strict=True):
            level_probabilities, level_regression = level_probabilities[index, :, 1:], level_regression[index]
            num_classes = level_probabilities.shape[-1]
            level_scores = level_probabilities.flatten()
            candidates = (level_scores > score_thresh).nonzero().flatten()
            level_scores, top = level_scores[candidates].topk(min(len(candidates), topk_candidates))
            candidates = candidates[top]
            level_ids = candidates // num_classes
            level_boxes = decode(level_regression[level_ids], level_anchors[level_ids])
            boxes.append(clip_boxes_to_image(level_boxes, image_shape))
            scores.append(level_scores)
            labels.append(candidates % num_classes + 1)
            anchor_ids.append(level_ids + offset)
            offset += len(level_anchors)
        boxes, scores, labels, anchor_ids = (torch.cat(t) for t in (boxes, scores, labels, anchor_ids))
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
        detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep],
                           "anchor_idx": anchor_ids[keep]})
    return detections


def _retinanet_detections(model: RetinaNet, outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]],
                          image_shapes: list[tuple[int, int]]) -> Targets:
    return select_detections([c.sigmoid() for c in outputs["cls_logits"]], outputs["bbox_regression"], anchors,
                             image_shapes, model.box_coder.decode_single, model.score_thresh,
                             model.topk_candidates, model.nms_thresh, model.detections_per_img)


def _fcos_detections(model: FCOS, outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]],
                     image_shapes: list[tuple[int, int]]) -> Targets:
    """FCOS scores a location by sqrt(class probability * centerness), as torchvision's FCOS."""
    probabilities = [(c.sigmoid() * t.sigmoid()).sqrt() for c, t in zip(outputs["cls_logits"],
                                                                        outputs["bbox_ctrness"], strict=True)]
    return select_detections(probabilities, outputs["bbox_regression"], anchors, image_shapes, model.box_coder.decode,
                             model.score_thresh, model.topk_candidates, model.nms_thresh, model.detections_per_img)


class ForegroundRetinaNet(RetinaNet):
    """torchvision's RetinaNet whose detections never carry the background label 0 (see ``select_detections``)."""

    def postprocess_detections(self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]],
                               image_shapes: list[tuple[int, int]]) -> Targets:
        detections = _retinanet_detections(self, head_outputs, anchors, image_shapes)
        for d in detections:
            del d["anchor_idx"]
        return detections


class SoftplusConv2d(nn.Conv2d):
    """A conv whose outputs go through softplus: FCOS's box distances, positive with a gradient everywhere.

    torchvision's FCOS head applies ReLU to its distance conv. A side whose
    pre-activation turns negative at every positive location then gets no
    gradient again, and its boxes stay collapsed: seen as a GIoU loss stuck
    at 0.48 with box IoU 0.5 on the one-batch overfit test, and as point-sized
    boxes after the demo's minute of training. ``relu(softplus(z))`` is
    ``softplus(z)``, so torchvision's head runs unchanged around it.
    """

    @classmethod
    def like(cls, conv: nn.Conv2d) -> SoftplusConv2d:
        """A copy of ``conv`` (shape, stride, padding, weights) with softplus on its output."""
        copy = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, conv.groups, conv.bias is not None)
        copy.load_state_dict(conv.state_dict())
        return copy

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(super().forward(x))


def fcos_assign(gt_boxes: Tensor, anchors: Tensor, level_counts: list[int], radius: float = 1.5,
                masks: Tensor | None = None) -> Tensor:
    """FCOS's assignment of locations to ground-truth boxes: (L,) box index per location, -1 for background.

    ``anchors`` (L, 4) are the locations' stride-sized squares, level by level (``level_counts`` per level). A
    location is a candidate for a box when it lies inside the box, within ``radius`` strides of its centre (centre
    sampling), and its largest distance to the box's sides is in its level's range (4 to 8 strides; the first
    level has no floor, the last no ceiling). Among candidates a location takes the smallest box.

    With ``masks`` (G, H, W), the objects' visible pixels in the image's frame, a candidate must lie on its object's
    pixels, and centre sampling is around the mask's centre of mass (``on_mask``). Centre sampling around the box
    centre puts an occluded object's positives on its occluder where that covers the box centre, and their features
    then learn two objects. An object with no such candidate (a ring, whose mass centre is in its hole) takes its
    on-pixel candidates at any distance, and one without those (no pixel on a location) its box-centre candidates.
    Cost O(L * G), plus O(G * H * W) with masks.
    """
    if len(gt_boxes) == 0:
        return torch.full((len(anchors),), -1, dtype=torch.long, device=anchors.device)
    points = (anchors[:, :2] + anchors[:, 2:]) / 2  # (L, 2)
    stride = anchors[:, 2] - anchors[:, 0]  # (L,)
    sides = torch.cat([points[:, None] - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - points[:, None]], 2)
    floor, ceiling = 4 * stride, 8 * stride
    floor[: level_counts[0]] = 0
    ceiling[-level_counts[-1]:] = float("inf")
    reach = sides.amax(2)  # (L, G)
    in_range = (sides.amin(2) > 0) & (reach > floor[:, None]) & (reach < ceiling[:, None])
    centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (G, 2)
    candidate = in_range & _within(points, centres, radius * stride)
    if masks is not None:
        on_pixels, mass_centres = on_mask(points, masks)
        on_pixels &= in_range
        near_mass_centre = on_pixels & _within(points, mass_centres, radius * stride)
        candidate = torch.where(near_mass_centre.any(0), near_mass_centre,
                                torch.where(on_pixels.any(0), on_pixels, candidate))
    areas = (gt_boxes[:, 2:] - gt_boxes[:, :2]).prod(1)  # (G,)
    area_if_candidate = torch.where(candidate, areas[None], float("inf"))
    smallest, gt = area_if_candidate.min(1)
    return torch.where(smallest.isfinite(), gt, -1)


def _within(points: Tensor, centres: Tensor, reach: Tensor) -> Tensor:
    """(L, G): point l is less than ``reach[l]`` from centre g in both x and y."""
    return (points[:, None] - centres[None]).abs().amax(2) < reach[:, None]


def on_mask(points: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """(L, G): point l (x, y in pixels) lies on a pixel of mask g (G, H, W); and (G, 2) each mask's centre of mass
    (x, y; 0 for an empty mask). Points off the image are off every mask. Cost O(G * H * W + L * G)."""
    h, w = masks.shape[-2:]
    weights = masks.float()
    total = weights.sum((1, 2)).clamp(min=1)  # (G,)
    ys = torch.arange(h, dtype=weights.dtype, device=masks.device) + 0.5
    xs = torch.arange(w, dtype=weights.dtype, device=masks.device) + 0.5
    mass_centres = torch.stack([(weights.sum(1) * xs).sum(1), (weights.sum(2) * ys).sum(1)], 1) / total[:, None]
    pixel = points.floor().long()  # (L, 2) x, y
    inside = (pixel[:, 0] >= 0) & (pixel[:, 0] < w) & (pixel[:, 1] >= 0) & (pixel[:, 1] < h)
    x, y = pixel[:, 0].clamp(0, w - 1), pixel[:, 1].clamp(0, h - 1)
    return (masks[:, y, x] > 0).T & inside[:, None], mass_centres


def iou_quality_loss(quality_logits: Tensor, predicted: Tensor, truth: Tensor) -> Tensor:
    """Summed BCE of each foreground location's quality logit (F,) against the IoU of its predicted box with its
    ground-truth box (both (F, 4) xyxy; the IoU is a target, no gradient reaches the boxes through it).

    Trained so, FCOS's centerness branch predicts how well a location localises its object rather than how central
    it is, and the detection score sqrt(class x quality) ranks the well-localised boxes first (IoU-aware scoring,
    as in Wu et al.'s IoU-aware single-stage detector and VarifocalNet). Cost O(F).
    """
    iou = paired_box_iou(predicted, truth).detach()
    return F.binary_cross_entropy_with_logits(quality_logits, iou, reduction="sum")


def scoring_at_least(detection: dict[str, Tensor], thresh: float) -> dict[str, Tensor]:
    """The detections (every per-detection field) of one image whose score is at least ``thresh``. Cost O(N)."""
    keep = detection["scores"] >= thresh
    return {k: v[keep] for k, v in detection.items()}


class SPRMixin:
    """The SPR mask branch on a torchvision one-stage detector (``SPRNet``: RetinaNet, ``SPRFCOS``: FCOS).

    A subclass supplies ``detection_loss`` (the detector's losses and the mask-training positives: location,
    ground-truth index and the box the mask is learnt in) and
    ``detections`` (post-processing that keeps ``anchor_idx``). Options, set by ``_init_spr``:
        mask_positives_per_image: at most this many mask locations are sampled per image (paper: 300).
        class_agnostic_masks: one mask channel for every class instead of one per class.
        mask_score_thresh: only detections scoring at least this get a mask (and are returned); lower-scoring
            ones cost mask decoding and pasting but add little AP.
        mask_scoring: multiply each score by its mask's maskness (SOLO's mask quality, ``spr_head.maskness``).
        refine_boxes: replace each box by the tight box of its pasted mask.
        mask_loss_weight: the mask loss's weight in the total (1: the paper's plain sum).
        mask_frame_scale: each mask is learnt and pasted in its box scaled by this about its centre
            (``spr_head.scale_boxes``; 1: the box itself, as the paper does), so that it can reach past a box that
            cuts into its object.
        local_mask_features: add to SPR's logits those the finest FPN level gives inside each mask's frame
            (``spr_head.LocalMaskLogits``; off in the paper's SPR, which reads one location only).
    """

    def _init_spr(self, in_channels: int, num_classes: int, mask_head: nn.Module | None, mask_size: int,
                  mask_dilations: Sequence[int],
                  mask_positives_per_image: int, class_agnostic_masks: bool, mask_score_thresh: float,
                  mask_scoring: bool, refine_boxes: bool, mask_loss_weight: float, mask_frame_scale: float,
                  local_mask_features: bool) -> None:
        if mask_loss_weight <= 0:
            raise ValueError(f"mask_loss_weight must be positive, got {mask_loss_weight}")
        if mask_frame_scale < 1:
            raise ValueError(f"mask_frame_scale must be at least 1 (the box itself), got {mask_frame_scale}")
        self.mask_head = mask_head or SPRMaskHead(in_channels, 1 if class_agnostic_masks else num_classes,
                                                  tuple(mask_dilations), mask_size)
        self.mask_positives_per_image = mask_positives_per_image
        self.class_agnostic_masks = class_agnostic_masks
        self.mask_score_thresh = mask_score_thresh
        self.mask_scoring = mask_scoring
        self.refine_boxes = refine_boxes
        self.mask_loss_weight = mask_loss_weight
        self.mask_frame_scale = mask_frame_scale
        self.local_mask = (LocalMaskLogits(in_channels, 1 if class_agnostic_masks else num_classes)
                           if local_mask_features else None)

    def forward(self, images: list[Tensor], targets: Targets | None = None) -> dict[str, Tensor] | Targets:
        if self.training:
            _check_targets(images, targets)
        original_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
        images, targets = self.transform(images, targets)
        features = list(self.backbone(images.tensors).values())  # [(B, C, H_l, W_l)]
        head_outputs = self.head(features)  # cls_logits (B, L*A, K), bbox_regression (B, L*A, 4), ...
        anchors = self.anchor_generator(images, features)  # [(L*A, 4)] per image
        level_counts = [h * w * self.anchor_generator.num_anchors_per_location()[0] for h, w in
                        (f.shape[-2:] for f in features)]
        scale = features[0].shape[-1] / images.tensors.shape[-1]  # the finest level's pixels per image pixel
        if self.training:
            losses, positives = self.detection_loss(targets, head_outputs, anchors, level_counts)
            return {**losses, "loss_mask": self.mask_loss_weight * self.mask_loss(features, targets, positives, scale)}
        split_outputs = {k: list(v.split(level_counts, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(level_counts)) for a in anchors]
        detections = [scoring_at_least(d, self.mask_score_thresh)
                      for d in self.detections(split_outputs, split_anchors, images.image_sizes)]
        masks = self.decode_masks(features, detections, scale)
        detections = self.transform.postprocess(detections, images.image_sizes, original_sizes)
        return [self.add_masks(d, m, size) for d, m, size in zip(detections, masks, original_sizes, strict=True)]

    def mask_labels(self, labels: Tensor) -> Tensor:
        return torch.zeros_like(labels) if self.class_agnostic_masks else labels

    def mask_logits(self, features: list[Tensor], image: Tensor, location: Tensor, frames: Tensor,
                    spatial_scale: float) -> Tensor:
        """(N, K, M, M) mask logits of N locations (image and location indices (N,)) whose masks lie in ``frames``
        (N, 4) xyxy: SPR's, plus the finest level's inside each frame with ``local_mask_features``."""
        logits = self.mask_head(features, image, location)
        if self.local_mask is not None:
            rois = torch.cat([image[:, None].to(frames.dtype), frames], 1)
            logits = logits + self.local_mask(features[0], rois, spatial_scale, self.mask_head.mask_size)
        return logits

    def mask_loss(self, features: list[Tensor], targets: Targets, positives: list[Positives],
                  spatial_scale: float) -> Tensor:
        """SPR mask loss over the mask-training ``positives`` (location, gt, frame) of every image in the batch."""
        size = self.mask_head.mask_size
        images, locations, labels, frames, soft_masks = [], [], [], [], []
        for i, (target, (location, gt, frame)) in enumerate(zip(targets, positives, strict=True)):
            if len(location) > self.mask_positives_per_image:
                keep = torch.randperm(len(location), device=location.device)[: self.mask_positives_per_image]
                location, gt, frame = location[keep], gt[keep], frame[keep]
            if len(location) == 0:
                continue
            images.append(torch.full_like(location, i))
            locations.append(location)
            labels.append(self.mask_labels(target["labels"][gt]))
            frames.append(scale_boxes(frame, self.mask_frame_scale))
            soft_masks.append(mask_targets(target["masks"], frames[-1], size, owners=gt))
        if not locations:  # background-only batch: decode one location so the zero loss reaches every weight
            zero = torch.zeros(1, dtype=torch.long, device=features[0].device)
            logits = self.mask_logits(features, zero, zero, features[0].new_zeros(1, 4), spatial_scale)[:0]
            return spr_mask_loss(logits, zero[:0], logits.new_zeros(0, size, size))
        logits = self.mask_logits(features, torch.cat(images), torch.cat(locations), torch.cat(frames), spatial_scale)
        return spr_mask_loss(logits, torch.cat(labels), torch.cat(soft_masks))

    @torch.no_grad()
    def decode_masks(self, features: list[Tensor], detections: Targets, spatial_scale: float) -> list[Tensor]:
        """The masks of these detections only (never densely): (N_i, M, M) box-frame probabilities per image."""
        num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        image = torch.cat([torch.full_like(d["anchor_idx"], i) for i, d in enumerate(detections)])
        location = torch.cat([d.pop("anchor_idx") for d in detections]) // num_anchors
        labels = self.mask_labels(torch.cat([d["labels"] for d in detections]))
        frames = scale_boxes(torch.cat([d["boxes"] for d in detections]), self.mask_frame_scale)
        logits = self.mask_logits(features, image, location, frames, spatial_scale)  # (N, K, M, M)
        masks = logits[torch.arange(len(labels)), labels].sigmoid()  # (N, M, M)
        return list(masks.split([len(d["labels"]) for d in detections]))

    def add_masks(self, detection: dict[str, Tensor], masks: Tensor, image_size: tuple[int, int]) -> dict[str, Tensor]:
        """Paste one image's box-frame masks at its original size: ``masks`` (N, 1, H, W), as Mask R-CNN's."""
        pasted = paste_masks(masks, scale_boxes(detection["boxes"], self.mask_frame_scale), *image_size)  # (N, H, W)
        if self.mask_scoring:
            detection["scores"] = detection["scores"] * maskness(masks)
        if self.refine_boxes:
            detection["boxes"] = mask_boxes(pasted, detection["boxes"])
        detection["masks"] = pasted[:, None]
        return detection


_SPR_OPTIONS = """
    Args:
        mask_head: defaults to ``SPRMaskHead(backbone.out_channels, num_classes, mask_size=mask_size)``.
        mask_size: the side M of the box-frame mask (paper: 32).
        mask_dilations: the fusion's 3x3 conv dilations (paper: 2, 4, 6 on COCO-sized images).
        mask_positives_per_image, class_agnostic_masks, mask_score_thresh, mask_scoring, refine_boxes,
        mask_loss_weight, mask_frame_scale, local_mask_features:
            see ``SPRMixin``.

    Targets in train mode: torchvision's ``boxes`` (G, 4) xyxy and ``labels`` (G,),
    plus ``masks`` (G, H, W) uint8 at the image's size.
"""


class SPRNet(SPRMixin, RetinaNet):
    __doc__ = """RetinaNet + the SPR mask branch (the paper's model). Every RetinaNet argument is accepted unchanged.

    Mask-training locations: those whose best anchor has IoU above ``mask_fg_iou_thresh`` (paper: 0.7) with a box,
    and every box's best location (``spr_head.mask_positives``).
    """ + _SPR_OPTIONS

    def __init__(self, backbone: nn.Module, num_classes: int, *, mask_head: nn.Module | None = None,
                 mask_size: int = MASK_SIZE, mask_dilations: Sequence[int] = DILATIONS,
                 mask_fg_iou_thresh: float = 0.7, mask_positives_per_image: int = 300,
                 class_agnostic_masks: bool = False, mask_score_thresh: float = 0.0, mask_scoring: bool = False,
                 refine_boxes: bool = False, mask_loss_weight: float = 1.0, mask_frame_scale: float = 1.0,
                 local_mask_features: bool = False, **kwargs: Any):
        super().__init__(backbone, num_classes, **kwargs)
        self._init_spr(backbone.out_channels, num_classes, mask_head, mask_size, mask_dilations,
                       mask_positives_per_image, class_agnostic_masks, mask_score_thresh, mask_scoring, refine_boxes,
                       mask_loss_weight, mask_frame_scale, local_mask_features)
        self.mask_fg_iou_thresh = mask_fg_iou_thresh

    def detection_loss(self, targets: Targets, head_outputs: dict[str, Tensor], anchors: list[Tensor],
                       level_counts: list[int]) -> tuple[dict[str, Tensor], list[Positives]]:
        num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        positives = []
        for t, a in zip(targets, anchors, strict=True):
            location, gt = (mask_positives(box_iou(t["boxes"], a), num_anchors, self.mask_fg_iou_thresh)
                            if len(t["boxes"]) else (torch.zeros(0, dtype=torch.long, device=a.device),) * 2)
            positives.append((location, gt, t["boxes"][gt]))
        return self.compute_loss(targets, head_outputs, anchors), positives

    def detections(self, outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]],
                   image_shapes: list[tuple[int, int]]) -> Targets:
        return _retinanet_detections(self, outputs, anchors, image_shapes)


class SPRFCOS(SPRMixin, FCOS):
    __doc__ = """FCOS + the SPR mask branch: the paper attaches SPR to any one-stage detector. Every FCOS argument
    is accepted unchanged.

    FCOS assigns locations by centre sampling (``fcos_assign``) and scores them with a centerness branch, and its
    box loss is GIoU; the mask trains at every location FCOS assigns to a box (sampled down to
    ``mask_positives_per_image``), so each object has several mask positives, not one best anchor.
    ``mask_in_predicted_boxes``: each positive learns its mask in the frame of its own predicted box (where that
    overlaps the ground truth by IoU 0.5, ``spr_head.mask_frames``), the box it is pasted into at inference,
    instead of in the ground-truth box. ``iou_quality``: the centerness branch learns each location's predicted-box
    IoU with its object instead of its centerness (``iou_quality_loss``), so scores rank localisation quality.
    ``mask_centre_sampling``: positives are sampled on each object's own pixels around its mask's centre of mass,
    not around its box centre (``fcos_assign`` with masks), so an occluded object's positives are not its occluder's.
    """ + _SPR_OPTIONS

    def __init__(self, backbone: nn.Module, num_classes: int, *, mask_head: nn.Module | None = None,
                 mask_size: int = MASK_SIZE, mask_dilations: Sequence[int] = DILATIONS,
                 mask_positives_per_image: int = 300, class_agnostic_masks: bool = False,
                 mask_score_thresh: float = 0.0, mask_scoring: bool = False, refine_boxes: bool = False,
                 mask_in_predicted_boxes: bool = False, mask_loss_weight: float = 1.0,
                 mask_frame_scale: float = 1.0, iou_quality: bool = False, local_mask_features: bool = False,
                 mask_centre_sampling: bool = False, **kwargs: Any):
        super().__init__(backbone, num_classes, **kwargs)
        self._init_spr(backbone.out_channels, num_classes, mask_head, mask_size, mask_dilations,
                       mask_positives_per_image, class_agnostic_masks, mask_score_thresh, mask_scoring, refine_boxes,
                       mask_loss_weight, mask_frame_scale, local_mask_features)
        self.mask_in_predicted_boxes = mask_in_predicted_boxes
        self.iou_quality = iou_quality
        self.mask_centre_sampling = mask_centre_sampling

    def detection_loss(self, targets: Targets, head_outputs: dict[str, Tensor], anchors: list[Tensor],
                       level_counts: list[int]) -> tuple[dict[str, Tensor], list[Positives]]:
        matched = [fcos_assign(t["boxes"], a, level_counts, self.center_sampling_radius,
                               t["masks"] if self.mask_centre_sampling else None)
                   for t, a in zip(targets, anchors, strict=True)]
        decode = self.mask_in_predicted_boxes or self.iou_quality
        positives, predicted, truths = [], [], []
        for i, (t, a, m) in enumerate(zip(targets, anchors, matched, strict=True)):
            location = (m >= 0).nonzero().flatten()
            gt = m[location]
            truth = t["boxes"][gt]
            # (F_i, 4) each positive's predicted box: a target for the mask frame and the quality, never a path
            # for their gradients into the box branch
            boxes = self.box_coder.decode(head_outputs["bbox_regression"][i, location].detach(),
                                          a[location]) if decode else truth
            predicted.append(boxes)
            truths.append(truth)
            positives.append((location, gt, mask_frames(boxes, truth) if self.mask_in_predicted_boxes else truth))
        losses = self.head.compute_loss(targets, head_outputs, anchors, matched)
        if self.iou_quality:  # the same normaliser as torchvision's centerness loss: foreground locations
            flat = torch.cat([i * len(a) + location for i, (a, (location, _, _)) in enumerate(zip(anchors, positives,
                                                                                                    strict=True))])
            quality = head_outputs["bbox_ctrness"].flatten()[flat]  # (F,)
            losses["bbox_ctrness"] = iou_quality_loss(quality, torch.cat(predicted), torch.cat(truths)) / max(
                1, len(quality))
        return losses, positives

    def detections(self, outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]],
                   image_shapes: list[tuple[int, int]]) -> Targets:
        return _fcos_detections(self, outputs, anchors, image_shapes)


def _check_targets(images: list[Tensor], targets: Targets | None) -> None:
    """Training targets must be well formed before any compute; the message names the image and box."""
    if targets is None or len(targets) != len(images):
        raise ValueError(f"train mode needs one target dict per image ({len(images)} images, "
                         f"{'no' if targets is None else len(targets)} targets)")
    for i, (image, target) in enumerate(zip(images, targets, strict=True)):
        boxes, masks = target.get("boxes"), target.get("masks")
        if boxes is None or boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: 'boxes' must be a (G, 4) tensor, got "
                             f"{None if boxes is None else tuple(boxes.shape)}")
        labels = target.get("labels")
        if labels is None or labels.shape != (len(boxes),) or labels.dtype != torch.int64:
            raise ValueError(f"target {i}: 'labels' must be an int64 tensor of shape ({len(boxes)},), got "
                             f"{None if labels is None else f'{labels.dtype} {tuple(labels.shape)}'}")
        if masks is None or masks.shape != (len(boxes), *image.shape[-2:]):
            raise ValueError(f"target {i}: 'masks' must be ({len(boxes)}, {image.shape[-2]}, {image.shape[-1]}) "
                             f"to match its boxes and image, got {None if masks is None else tuple(masks.shape)}")
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(1)
        if degenerate.any():
            raise ValueError("All bounding boxes should have positive height and width. Found invalid box "
                             f"{boxes[degenerate.nonzero()[0, 0]].tolist()} for target at index {i}.")


# --------------------------------------------------------------------------- builders

BACKBONES: dict[str, Callable[..., nn.Module]] = {"resnet18": resnet18, "resnet50": resnet50}
SOFT_BACKBONES = tuple(SOFT_MODELS)  # soft_tiny ... soft_huge, soft_norm_tiny ... (timm names, see effdl.soft)
ALL_BACKBONES = (*BACKBONES, *SOFT_BACKBONES)
LAYERS = [1, 2, 3, 4]  # ResNet's layer k and SOFT's stage k - 1 both have stride 2 ** (k + 1): 4, 8, 16, 32


class FPNBackbone(nn.Module):
    """``body`` (images -> OrderedDict of maps, finest first, channels ``in_channels_list``) under an FPN.

    torchvision's ``BackboneWithFPN`` layout (``body``, ``fpn``, ``out_channels``) for any body: the FPN is
    torchvision's or, with ``gated``, ``GatedFPN``; ``extra_blocks`` defaults to a max-pooled level (Mask R-CNN's).
    """

    def __init__(self, body: nn.Module, in_channels_list: list[int], extra_blocks: ExtraFPNBlock | None = None,
                 gated: bool = False, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = (GatedFPN if gated else FeaturePyramidNetwork)(in_channels_list, out_channels,
                                                                   extra_blocks or LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.fpn(self.body(x))


class ListToDict(nn.Module):
    """A module returning a list of maps (timm's ``features_only`` models) -> OrderedDict ``"0", "1", ...``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return OrderedDict((str(i), f) for i, f in enumerate(self.net(x)))


def _weights_file(weights_backbone: str | Path) -> Path:
    path = Path(weights_backbone)
    if not path.is_file():
        raise EffdlError(f"backbone weights file not found: {path}")
    return path


def _check_layers(returned_layers: list[int] | None) -> list[int]:
    layers = returned_layers or LAYERS
    if not set(layers) <= set(LAYERS):
        raise EffdlError(f"returned layers must be among {LAYERS} (strides 4-32), got {layers}")
    return layers


def resnet_fpn(name: str, weights_backbone: str | Path | None = None, trainable_layers: int = 5,
               returned_layers: list[int] | None = None, extra_blocks: ExtraFPNBlock | None = None,
               gated: bool = False, out_channels: int = 256) -> FPNBackbone:
    """A ResNet-FPN backbone (``out_channels`` per map). ``weights_backbone``: a local torchvision ResNet state-dict
    file (no downloads).

    Pretrained backbones get frozen batch norm (torchvision's convention); from scratch, batch norm trains.
    ``trainable_layers`` (0-5) counts from ``layer4`` down, as torchvision's; the rest is frozen.
    """
    if name not in BACKBONES:
        raise EffdlError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if not 0 <= trainable_layers <= 5:
        raise EffdlError(f"trainable_layers must be in 0-5, got {trainable_layers}")
    layers = _check_layers(returned_layers)
    norm_layer = nn.BatchNorm2d
    if weights_backbone is not None:
        from torchvision.ops.misc import FrozenBatchNorm2d

        norm_layer = FrozenBatchNorm2d
    body = BACKBONES[name](norm_layer=norm_layer)
    if weights_backbone is not None:
        path = _weights_file(weights_backbone)
        # The classifier is dropped by the layer getter, so a file without it (or with another class count) loads.
        state = {k: v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
                 if not k.startswith("fc.")}
        try:
            missing, unexpected = body.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise EffdlError(f"{path} is not a torchvision {name} state dict: {e}") from None
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise EffdlError(f"{path} is not a torchvision {name} state dict: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    trained = ("layer4", "layer3", "layer2", "layer1", "conv1")[:trainable_layers] + ("bn1",) * (trainable_layers == 5)
    for key, parameter in body.named_parameters():
        if not key.startswith(trained):
            parameter.requires_grad_(False)
    in_channels = [body.inplanes // 8 * 2 ** (k - 1) for k in layers]  # 64 * 2^(k-1) (x4 with bottlenecks)
    getter = IntermediateLayerGetter(body, {f"layer{k}": str(i) for i, k in enumerate(layers)})
    return FPNBackbone(getter, in_channels, extra_blocks, gated, out_channels)


def soft_fpn(name: str, weights_backbone: str | Path | None = None, returned_layers: list[int] | None = None,
             extra_blocks: ExtraFPNBlock | None = None, gated: bool = False, out_channels: int = 256) -> FPNBackbone:
    """A SOFT-FPN backbone: the stages of ``timm.create_model(name, features_only=True)`` under an FPN of
    ``out_channels`` per map.

    ``returned_layers`` numbers the stages as ResNet's layers (k = 1-4: strides 4, 8, 16, 32), so one detector
    recipe fits both. ``weights_backbone``: a local SOFT checkpoint (the reference's or ``effdl.soft``'s, any of
    the files timm's ``pretrained_cfg_overlay={"file": ...}`` takes), which then gets frozen batch norm in the
    conv stem and downsampling, as ``resnet_fpn`` does. Images must be padded to a multiple of 32
    (the detectors' transform does: ``size_divisible=32``).
    """
    if name not in SOFT_BACKBONES:
        raise EffdlError(f"unknown backbone {name!r}; choose one of {', '.join(SOFT_BACKBONES)}")
    layers = _check_layers(returned_layers)
    pretrained = {} if weights_backbone is None else {
        "pretrained": True, "pretrained_cfg_overlay": {"file": str(_weights_file(weights_backbone))}}
    net = timm.create_model(name, features_only=True, out_indices=[k - 1 for k in layers], **pretrained)
    if pretrained:
        net = timm.layers.freeze_batch_norm_2d(net)
    return FPNBackbone(ListToDict(net), net.feature_info.channels(), extra_blocks, gated, out_channels)


def fpn_backbone(name: str, weights_backbone: str | Path | None = None, **kwargs: Any) -> FPNBackbone:
    """``resnet_fpn`` or ``soft_fpn`` by backbone name; ``kwargs`` (returned_layers, extra_blocks, gated,
    out_channels) go to it."""
    if name in SOFT_BACKBONES:
        return soft_fpn(name, weights_backbone, **kwargs)
    if name in BACKBONES:
        return resnet_fpn(name, weights_backbone, **kwargs)
    raise EffdlError(f"unknown backbone {name!r}; choose one of {', '.join(ALL_BACKBONES)}")


def _check_padding(backbone_name: str, kwargs: dict[str, Any]) -> None:
    """SOFT needs maps divisible by 32: the detectors' transform pads the batch to ``size_divisible`` (32)."""
    divisible = kwargs.get("size_divisible", 32)
    if backbone_name in SOFT_BACKBONES and divisible % SOFT_STRIDE:
        raise EffdlError(f"{backbone_name} needs images padded to a multiple of {SOFT_STRIDE}, "
                         f"got size_divisible={divisible}")


def retinanet_anchors(smallest: int = 32) -> AnchorGenerator:
    """RetinaNet's anchors on P3-P7: sizes ``smallest * 2**level`` at 3 scales per octave and 3 aspect ratios."""
    sizes = tuple(tuple(int(s * 2 ** (i / 3)) for i in range(3)) for s in (smallest * 2 ** lvl for lvl in range(5)))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def _retinanet_parts(backbone_name: str, num_classes: int, weights_backbone: str | Path | None, gated: bool,
                     smallest_anchor: int) -> dict[str, Any]:
    """Backbone (ResNet- or SOFT-FPN, P3-P7, P6 from P5), anchors and head shared by SPRNet and its RetinaNet baseline.

    The heads follow torchvision's RetinaNet v2: GroupNorm in the class and box towers (without it, heads trained
    from scratch converge several times slower) and a GIoU box loss (on 64-px shapes after 300 steps: box AP 6.5
    vs 5.2 with L1, AP75 3.5 vs 1.2).
    """
    backbone = fpn_backbone(backbone_name, weights_backbone, returned_layers=[2, 3, 4],
                            extra_blocks=LastLevelP6P7(256, 256), gated=gated)
    anchors = retinanet_anchors(smallest_anchor)
    head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes,
                         norm_layer=partial(nn.GroupNorm, 32))
    head.regression_head._loss_type = "giou"  # torchvision's own switch, as in retinanet_resnet50_fpn_v2
    return {"backbone": backbone, "anchor_generator": anchors, "head": head}


# The options each family's builder sets when they are not given, over its class's defaults. torchvision keeps
# 300 detections per image; 100 is COCO's limit. SPR-FCOS: see ``sprnet_fcos``.
BUILDER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sprnet": {"detections_per_img": 100},
    "sprnet_fcos": {"detections_per_img": 100, "score_thresh": 0.05, "mask_score_thresh": 0.3,
                    "local_mask_features": True, "mask_centre_sampling": True},
    "retinanet": {"detections_per_img": 100},
    "maskrcnn": {},
}


def sprnet(backbone_name: str, num_classes: int, weights_backbone: str | Path | None = None, gated_fpn: bool = True,
           smallest_anchor: int = 32, **kwargs: Any) -> SPRNet:
    """SPRNet on a ResNet- or SOFT-(gated)FPN, P3-P7. ``kwargs`` go to ``SPRNet``/``RetinaNet`` (min_size ...).

    ``smallest_anchor``: the P3 anchor size in pixels of the resized image (torchvision: 32); lower it for small images.
    """
    kwargs = {**BUILDER_DEFAULTS["sprnet"], **kwargs}
    _check_padding(backbone_name, kwargs)
    parts = _retinanet_parts(backbone_name, num_classes, weights_backbone, gated_fpn, smallest_anchor)
    return SPRNet(num_classes=num_classes, **parts, **kwargs)


def sprnet_resnet50_fpn(num_classes: int, weights_backbone: str | Path | None = None, **kwargs: Any) -> SPRNet:
    """SPRNet, ResNet-50 gated FPN (the paper's model)."""
    return sprnet("resnet50", num_classes, weights_backbone, **kwargs)


def sprnet_resnet18_fpn(num_classes: int, weights_backbone: str | Path | None = None, **kwargs: Any) -> SPRNet:
    """SPRNet, ResNet-18 gated FPN: a light backbone for CPU runs."""
    return sprnet("resnet18", num_classes, weights_backbone, **kwargs)


def sprnet_fcos(backbone_name: str, num_classes: int, weights_backbone: str | Path | None = None,
                gated_fpn: bool = True, softplus_distances: bool = True, p2_level: bool = True,
                fpn_channels: int = 128, **kwargs: Any) -> SPRFCOS:
    """SPRNet on FCOS (``SPRFCOS``): SPRNet's backbone, torchvision's FCOS head (GroupNorm towers, GIoU, centerness).

    One location per position whose stride-sized square (4 ... 128 px on P2-P7) sets FCOS's scale ranges, so it
    takes no ``smallest_anchor``. ``kwargs`` go to ``SPRFCOS``/``FCOS``; the score threshold defaults to 0.05 like
    the RetinaNet family's (torchvision's FCOS: 0.2), masks are decoded for detections scoring 0.3 or more
    (``mask_score_thresh``; on the plateau benchmark this cost 0.1 mask AP and halved latency at 128 px, see the
    README), and ``local_mask_features`` and ``mask_centre_sampling`` are on (mask-centre sampling gave +4.0 mask AP
    alone at 10 epochs; with lr 3e-4, ``effdl.sprnet.train.FAMILY_LR``, the 20-epoch mask AP went from 37.6 to
    49.1). ``softplus_distances``: box distances through softplus instead of torchvision's ReLU (``SoftplusConv2d``;
    False only to measure the difference). ``p2_level``: FCOS on P2-P7, so objects under 32 px get stride-4
    locations as Mask R-CNN's P2 gives them (False: P3-P7, torchvision's FCOS); the head then runs on about four
    times the locations. ``fpn_channels``: the width of the FPN maps and so of the head towers and the mask head's
    input (torchvision: 256). The towers' cost goes with its square, so the default half width pays for P2: at 128
    channels on P2-P7 the model costs about RetinaNet's FLOPs on P3-P7 at 256.
    """
    if fpn_channels <= 0 or fpn_channels % 32:
        raise EffdlError(f"fpn_channels must be a positive multiple of 32 (the towers' GroupNorm has 32 groups), "
                         f"got {fpn_channels}")
    kwargs = {**BUILDER_DEFAULTS["sprnet_fcos"], **kwargs}
    _check_padding(backbone_name, kwargs)
    first = 1 if p2_level else 2  # the first ResNet stage with an FPN level: C2 (stride 4) or C3 (stride 8)
    backbone = fpn_backbone(backbone_name, weights_backbone, returned_layers=list(range(first, 5)),
                            extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels), gated=gated_fpn,
                            out_channels=fpn_channels)
    levels = 7 - first  # up to P7
    anchors = AnchorGenerator(tuple((2 ** (first + 1 + level),) for level in range(levels)), ((1.0,),) * levels)
    head = FCOSHead(backbone.out_channels, 1, num_classes)
    if softplus_distances:
        head.regression_head.bbox_reg = SoftplusConv2d.like(head.regression_head.bbox_reg)
    return SPRFCOS(backbone, num_classes, anchor_generator=anchors, head=head, **kwargs)


def retinanet(backbone_name: str, num_classes: int, weights_backbone: str | Path | None = None,
              smallest_anchor: int = 32, **kwargs: Any) -> RetinaNet:
    """The torchvision RetinaNet baseline on SPRNet's backbone and anchors (plain FPN, P3-P7)."""
    kwargs = {**BUILDER_DEFAULTS["retinanet"], **kwargs}
    _check_padding(backbone_name, kwargs)
    parts = _retinanet_parts(backbone_name, num_classes, weights_backbone, False, smallest_anchor)
    return ForegroundRetinaNet(num_classes=num_classes, **parts, **kwargs)


def maskrcnn(backbone_name: str, num_classes: int, weights_backbone: str | Path | None = None,
             smallest_anchor: int = 32, **kwargs: Any) -> MaskRCNN:
    """The torchvision Mask R-CNN baseline on the same backbone (``maskrcnn_resnet50_fpn``'s FPN, P2-P6).

    Its RPN anchors are one size per level from ``smallest_anchor`` up, as torchvision's (32 ... 512).
    """
    _check_padding(backbone_name, kwargs)
    sizes = tuple((smallest_anchor * 2 ** lvl,) for lvl in range(5))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return MaskRCNN(fpn_backbone(backbone_name, weights_backbone), num_classes, rpn_anchor_generator=anchors,
                    **kwargs)


# Every detector on every backbone: sprnet_resnet18_fpn, sprnet_fcos_resnet18_fpn, retinanet_soft_tiny_fpn,
# maskrcnn_soft_norm_small_fpn ...
FAMILIES: dict[str, Callable[..., nn.Module]] = {"sprnet": sprnet, "sprnet_fcos": sprnet_fcos, "retinanet": retinanet,
                                               "maskrcnn": maskrcnn}
ANCHOR_FREE = ("sprnet_fcos",)  # families without a ``smallest_anchor``
DETECTORS: dict[str, Callable[..., nn.Module]] = {
    f"{family}_{backbone}_fpn": partial(build, backbone)
    for family, build in FAMILIES.items()
    for backbone in (*BACKBONES, *SOFT_BACKBONES)
}


FAMILY_CLASSES: dict[str, type[nn.Module]] = {"sprnet": SPRNet, "sprnet_fcos": SPRFCOS,
                                              "retinanet": ForegroundRetinaNet, "maskrcnn": MaskRCNN}
# Arguments that are not options: set from the model's name, or modules the builder makes.
_NOT_OPTIONS = {"self", "backbone_name", "backbone", "num_classes", "anchor_generator", "head",
                "rpn_anchor_generator", "mask_head"}


def _named_defaults(function: Callable[..., Any]) -> dict[str, Any]:
    """``function``'s keyword-passable arguments, each with its default (``inspect.Parameter.empty`` if none)."""
    return {p.name: p.default for p in inspect.signature(function).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _NOT_OPTIONS}


def _family_arguments(family: str, modules: tuple[str, ...]) -> dict[str, Any]:
    """The named arguments, each with its default, of ``family``'s builder over those of its class's ``__init__``s
    defined in ``modules`` (base classes first, so a subclass's default wins over its base's)."""
    arguments: dict[str, Any] = {}
    for cls in reversed(FAMILY_CLASSES[family].__mro__):
        if "__init__" in vars(cls) and cls.__module__.startswith(modules):
            arguments |= _named_defaults(cls.__init__)
    return arguments | _named_defaults(FAMILIES[family])


def detector_family(name: str) -> str:
    """The ``FAMILIES`` key of a ``DETECTORS`` name: ``sprnet_fcos`` for ``sprnet_fcos_resnet18_fpn``."""
    return next(f for f in sorted(FAMILIES, key=len, reverse=True) if name.startswith(f"{f}_"))


def detector_options(name: str) -> list[str]:
    """The keyword options a ``DETECTORS`` model accepts beyond its name and class count (mask_size, score_thresh,
    ...): its family builder's, its class's and its torchvision base classes' named arguments."""
    return sorted(_family_arguments(detector_family(name), ("effdl", "torchvision")))


def detector_defaults(name: str) -> dict[str, Any]:
    """The value effdl gives each of a ``DETECTORS`` model's options when it is not passed: its family builder's
    (``BUILDER_DEFAULTS``, then its signature) over its effdl classes' ``__init__`` defaults.

    torchvision's own defaults are left out: the installed torchvision fixes them. A training config pins these
    (``DetectionTrainConfig.model_options``), so that a checkpoint resumes and loads as the model it was trained as
    after a later effdl changes a default.
    """
    family = detector_family(name)
    defaults = _family_arguments(family, ("effdl",)) | BUILDER_DEFAULTS[family]
    return {option: value for option, value in defaults.items() if value is not inspect.Parameter.empty}


def build_detector(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """One of ``DETECTORS`` by name, e.g. ``build_detector("maskrcnn_resnet18_fpn", 6, min_size=256)`` or
    ``build_detector("sprnet_soft_tiny_fpn", 6, weights_backbone="soft_tiny.pth")``."""
    if name not in DETECTORS:
        raise EffdlError(f"unknown model {name!r}; choose one of {', '.join(DETECTORS)}")
    return DETECTORS[name](num_classes=num_classes, **kwargs)
