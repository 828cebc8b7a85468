"""COCO evaluation and visualisation for SPRNet (and any torchvision-style detector).

Model outputs follow torchvision's Mask R-CNN in eval mode: one dict per image
with ``boxes`` [N, 4] xyxy in original-image pixels, ``labels`` [N] (contiguous
1..K), ``scores`` [N] and, for mask models, ``masks`` [N, 1, H, W] probabilities.

The pipeline is ``predict_dataset`` (model -> COCO result dicts, masks as
compressed RLE) -> ``evaluate_coco`` (pycocotools ``COCOeval`` -> AP numbers)
-> ``format_metrics`` (table rows). ``evaluate_model`` chains the first two.
``draw_overlay`` / ``save_overlay`` render predictions for a quick look.
"""

from __future__ import annotations

import colorsys
import contextlib
import copy
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich.progress import track
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from effdl.errors import EffdlError
from effdl.progress import console
from effdl.sprnet.data import collate

COCO_MAX_DETS = 100  # COCOeval's largest maxDets: detections beyond the top 100 per image never count
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6], in order
IOU_TYPES = ("bbox", "segm")


def coco_results(predictions: Sequence[dict[str, Tensor]], image_ids: Sequence[int],
                 label_to_cat_id: Callable[[int], int], mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """Model outputs -> COCO result dicts (json-serialisable), one per detection.

    ``predictions[i]`` belongs to image ``image_ids[i]``. Each result has
    ``image_id``, ``category_id`` (``label_to_cat_id(label)``), ``bbox`` as
    [x, y, w, h] floats and ``score``; when the prediction has ``masks``, also
    ``segmentation``: the compressed RLE of ``masks[:, 0] > mask_threshold``
    with ``counts`` as str. Only the 100 highest-scoring detections of each
    image are kept, as COCOeval ignores the rest anyway (maxDets=100); ties
    keep the model's order.
    """
    if len(predictions) != len(image_ids):
        raise EffdlError(f"got {len(predictions)} predictions for {len(image_ids)} image ids")
    results: list[dict[str, Any]] = []
    for pred, image_id in zip(predictions, image_ids, strict=True):
        missing = [key for key in ("boxes", "labels", "scores") if key not in pred]
        if missing:
            raise EffdlError(f"prediction for image {image_id} lacks {missing}")
        scores = pred["scores"].detach().float().cpu()
        n = scores.numel()
        if pred["boxes"].shape != (n, 4) or pred["labels"].shape != (n,):
            raise EffdlError(f"prediction for image {image_id}: expected boxes [{n}, 4] and labels [{n}] for {n} "
                             f"scores, got {tuple(pred['boxes'].shape)} and {tuple(pred['labels'].shape)}")
        keep = scores.argsort(descending=True, stable=True)[:COCO_MAX_DETS]
        boxes = pred["boxes"].detach().float().cpu()[keep]
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        cat_ids = [int(label_to_cat_id(label)) for label in pred["labels"].cpu()[keep].tolist()]
        rles = _encode_masks(pred["masks"], keep, mask_threshold, image_id) if "masks" in pred else None
        for j, (box, cat_id, score) in enumerate(zip(xywh, cat_ids, scores[keep].tolist(), strict=True)):
            result = {"image_id": int(image_id), "category_id": cat_id, "bbox": box, "score": score}
            if rles is not None:
                result["segmentation"] = rles[j]
            results.append(result)
    return results


def _encode_masks(masks: Tensor, keep: Tensor, threshold: float, image_id: int) -> list[dict[str, Any]]:
    """Compressed RLEs of ``masks[keep, 0] > threshold`` in one pycocotools call."""
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise EffdlError(f"masks for image {image_id} must be [N, 1, H, W], got {tuple(masks.shape)}")
    if len(keep) == 0:
        return []
    binary = (masks.detach()[keep.to(masks.device), 0] > threshold).cpu().numpy().astype(np.uint8)  # [N, H, W]
    # pycocotools wants one Fortran-ordered [H, W, N] array
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")  # bytes are not json-serialisable
    return rles


def evaluate_coco(coco_gt: COCO, results: list[dict[str, Any]], iou_types: Sequence[str] = IOU_TYPES,
                  image_ids: Sequence[int] | None = None, verbose: bool = False) -> dict[str, dict[str, float]]:
    """COCO AP of ``results`` against ``coco_gt``: ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}``.

    Values are fractions in [0, 1] taken from ``COCOeval.stats[0:6]``; a
    metric with no ground truth to score (pycocotools' -1, e.g. APl when no
    object is large) is NaN. ``image_ids`` restricts the evaluation to those
    images (default: every image of ``coco_gt``). An empty ``results`` list is
    evaluated as "nothing detected": AP is 0 wherever ground truth exists.
    For ``segm`` the boxes are left out of the results so that pycocotools
    takes a detection's area (small/medium/large) from its mask, not its box.
    pycocotools' printout is shown only when ``verbose``.
    """
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown or not iou_types:
        raise EffdlError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {tuple(iou_types)}")
    gt_image_ids, gt_cat_ids = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    if image_ids is not None and not set(image_ids) <= gt_image_ids:
        raise EffdlError(f"image ids {sorted(set(image_ids) - gt_image_ids)[:5]} are not in the ground truth")
    for result in results:
        if result["image_id"] not in gt_image_ids or result["category_id"] not in gt_cat_ids:
            raise EffdlError(f"result for image {result['image_id']}, category {result['category_id']}: "
                             "image or category is not in the ground truth")
    if "segm" in iou_types and not all("segmentation" in result for result in results):
        raise EffdlError("segm evaluation needs a 'segmentation' in every result (did the model predict masks?)")

    metrics: dict[str, dict[str, float]] = {}
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        for iou_type in iou_types:
            # loadRes annotates (and so mutates) the dicts it gets: hand it copies
            drop = {"bbox"} if iou_type == "segm" else set()
            dets = [{k: v for k, v in result.items() if k not in drop} for result in results]
            coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(coco_gt)  # loadRes fails on []
            coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                coco_eval.params.imgIds = sorted(set(image_ids))
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
            metrics[iou_type] = {name: float(value) if value >= 0 else math.nan
                                 for name, value in zip(METRIC_NAMES, coco_eval.stats[:6], strict=True)}
    return metrics


def _empty_results(coco_gt: COCO) -> COCO:
    """A result set with no detections over ``coco_gt``'s images and categories."""
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]),
                       "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def predict_dataset(model: nn.Module, dataset: Any, batch_size: int = 4, device: str | torch.device = "cpu",
                    progress: bool = True, num_workers: int = 0, mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """COCO result dicts (see ``coco_results``) of ``model`` in eval mode over every image of ``dataset``.

    ``dataset`` is a ``CocoInstances``-like object (``image_ids``,
    ``label_to_cat_id``, items ``(image, target)``); images are sent to
    ``device``, where the model must already be. The model's train/eval mode
    is restored afterwards.
    """
    return _predict(model, dataset, batch_size, device, progress, num_workers, mask_threshold)[0]


@torch.inference_mode()
def _predict(model: nn.Module, dataset: Any, batch_size: int = 4, device: str | torch.device = "cpu",
             progress: bool = True, num_workers: int = 0,
             mask_threshold: float = 0.5) -> tuple[list[dict[str, Any]], bool]:
    """``predict_dataset``'s results, and whether the model predicted masks (known even when it detected nothing)."""
    if batch_size < 1:
        raise EffdlError(f"batch_size must be >= 1, got {batch_size}")
    image_ids = list(dataset.image_ids)
    if len(image_ids) != len(dataset):
        raise EffdlError(f"dataset has {len(dataset)} items but {len(image_ids)} image ids")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    has_masks, done = False, 0
    try:
        for images, _ in track(loader, description="evaluate", total=len(loader), console=console,
                               disable=not progress):
            outputs = model([image.to(device) for image in images])
            # results keep masks only as RLE: the [N, 1, H, W] probabilities are dropped batch by batch
            outputs = [{key: value.cpu() for key, value in output.items()} for output in outputs]
            has_masks = has_masks or any("masks" in output for output in outputs)
            results += coco_results(outputs, image_ids[done:done + len(images)], dataset.label_to_cat_id,
                                    mask_threshold)
            done += len(images)
    finally:
        model.train(was_training)
    return results, has_masks


def evaluate_model(model: nn.Module, dataset: Any, verbose: bool = False, **kwargs: Any) -> dict[str, dict[str, float]]:
    """COCO AP of ``model`` on ``dataset`` (see ``evaluate_coco``) over the dataset's images only.

    Box AP always, mask AP too when the model predicts ``masks``. ``kwargs``
    go to ``predict_dataset`` (batch_size, device, progress, ...).
    """
    results, has_masks = _predict(model, dataset, **kwargs)
    iou_types = IOU_TYPES if has_masks else ("bbox",)
    return evaluate_coco(dataset.coco, results, iou_types, image_ids=dataset.image_ids, verbose=verbose)


def format_metrics(metrics: Mapping[str, Mapping[str, float]]) -> list[tuple[str, ...]]:
    """Table rows ``(iou_type, AP, AP50, AP75, APs, APm, APl)`` in percent with one decimal ("45.3"), NaN as "-".

    Column headers: ``("IoU type", *METRIC_NAMES)``.
    """
    rows = []
    for iou_type, values in metrics.items():
        missing = [name for name in METRIC_NAMES if name not in values]
        if missing:
            raise EffdlError(f"metrics for {iou_type!r} lack {missing}")
        rows.append((iou_type, *("-" if math.isnan(values[name]) else f"{100 * values[name]:.1f}"
                                 for name in METRIC_NAMES)))
    return rows


def draw_overlay(image: Tensor, prediction: dict[str, Tensor], category_names: Sequence[str],
                 score_threshold: float = 0.5, mask_threshold: float = 0.5) -> Tensor:
    """uint8 [3, H, W] copy of ``image`` with the detections scoring above ``score_threshold`` drawn on it.

    ``image`` is float [3, H, W] in [0, 1] or uint8. Each detection gets its
    own colour: its mask (``> mask_threshold``, if the prediction has masks) is
    blended in at alpha 0.5 and its box is outlined with a "name 0.93" caption,
    ``name`` being ``category_names[label - 1]``.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise EffdlError(f"image must be [3, H, W], got {tuple(image.shape)}")
    canvas = image.detach().to("cpu", copy=True)
    if canvas.dtype != torch.uint8:
        canvas = (canvas.float().clamp(0, 1) * 255).round().to(torch.uint8)
    keep = prediction["scores"].detach().cpu() > score_threshold
    if not keep.any():  # torchvision's drawing functions warn on empty input
        return canvas
    labels = prediction["labels"].cpu()[keep].tolist()
    bad = [label for label in labels if not 1 <= label <= len(category_names)]
    if bad:
        raise EffdlError(f"labels {bad} are outside 1..{len(category_names)} (the category names given)")
    colors = _palette(len(labels))
    if "masks" in prediction:
        masks = prediction["masks"].detach().cpu()[keep, 0] > mask_threshold
        if masks.shape[-2:] != canvas.shape[-2:]:
            raise EffdlError(f"masks are {tuple(masks.shape[-2:])}, image is {tuple(canvas.shape[-2:])}")
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.5, colors=colors)
    captions = [f"{category_names[label - 1]} {score:.2f}"
                for label, score in zip(labels, prediction["scores"].cpu()[keep].tolist(), strict=True)]
    return draw_bounding_boxes(canvas, prediction["boxes"].detach().cpu()[keep], labels=captions, colors=colors,
                               width=2)


def _palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct bright colours: hues a golden-ratio step apart never repeat and stay well separated."""
    return [tuple(round(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95))
            for i in range(n)]


def save_overlay(path: str | os.PathLike[str], image: Tensor) -> None:
    """Write a uint8 [3, H, W] image (e.g. from ``draw_overlay``) to ``path`` as PNG, creating parent folders."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise EffdlError(f"expected a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # PIL, not torchvision.io: torchvision deprecated its image encoders in 0.29
    Image.fromarray(image.detach().cpu().permute(1, 2, 0).numpy()).save(path, format="PNG")
