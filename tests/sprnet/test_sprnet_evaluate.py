import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import nn

from effdl.errors import EffdlError
from effdl.sprnet.evaluate import (
    COCO_MAX_DETS,
    METRIC_NAMES,
    coco_results,
    draw_overlay,
    evaluate_coco,
    evaluate_model,
    format_metrics,
    predict_dataset,
    save_overlay,
)

# pycocotools' decode trips numpy 2's __array__ copy deprecation
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CAT_IDS = [2, 5, 7]  # non-contiguous COCO ids; model labels are 1, 2, 3
CAT_NAMES = ["cat", "bird", "dog"]


def label_to_cat_id(label: int) -> int:
    return CAT_IDS[label - 1]


def _rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _disk(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)


def _build_gt() -> COCO:
    """3 images, 3 categories, objects in all three area buckets, masks as compressed RLE and as polygons."""
    images = [{"id": 11, "height": 64, "width": 80}, {"id": 12, "height": 64, "width": 80},
              {"id": 13, "height": 112, "width": 128}]
    objects = [  # (image id, category id, RLE mask or polygon)
        (11, 2, _rect(64, 80, 5, 5, 17, 15)),  # small
        (11, 7, [[30.0, 10.0, 75.0, 12.0, 72.0, 55.0, 40.0, 60.0, 28.0, 35.0]]),  # medium polygon
        (11, 5, [[4.0, 40.0, 20.0, 40.0, 12.0, 58.0]]),  # small triangle
        (12, 2, _rect(64, 80, 40, 20, 76, 60)),  # medium
        (12, 7, _disk(64, 80, 15, 15, 6)),  # small, not a box
        (12, 2, [[5.0, 45.0, 25.0, 45.0, 25.0, 60.0, 5.0, 60.0]]),  # small polygon
        (13, 7, _rect(112, 128, 10, 5, 120, 105)),  # large
        (13, 5, [[20.0, 30.0, 60.0, 30.0, 60.0, 70.0]]),  # medium-ish triangle
        (13, 2, _disk(112, 128, 100, 95, 5)),  # small
    ]
    annotations = []
    for ann_id, (image_id, cat_id, seg) in enumerate(objects, start=1):
        h, w = (112, 128) if image_id == 13 else (64, 80)
        if isinstance(seg, np.ndarray):
            rle = mask_utils.encode(np.asfortranarray(seg))
            segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        else:
            segmentation = seg
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat_id, "iscrowd": 0,
                            "segmentation": segmentation, "area": float(mask_utils.area(rle)),
                            "bbox": mask_utils.toBbox(rle).tolist()})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c, "name": n} for c, n in zip(CAT_IDS, CAT_NAMES, strict=True)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@pytest.fixture(scope="module")
def coco_gt() -> COCO:
    return _build_gt()


def _gt_prediction(coco: COCO, image_id: int, masks: bool = True) -> dict[str, torch.Tensor]:
    """The ground truth of one image in model-output format (score 1)."""
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
    pred = {"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "labels": torch.tensor([CAT_IDS.index(a["category_id"]) + 1 for a in anns]),
            "scores": torch.ones(len(anns))}
    if masks:
        pred["masks"] = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).float()[:, None]
    return pred


def _subset(pred: dict[str, torch.Tensor], keep) -> dict[str, torch.Tensor]:
    return {k: v[keep] for k, v in pred.items()}


def test_ground_truth_as_predictions_scores_ap_one(coco_gt):
    image_ids = coco_gt.getImgIds()
    results = coco_results([_gt_prediction(coco_gt, i) for i in image_ids], image_ids, label_to_cat_id)
    assert {r["category_id"] for r in results} == set(CAT_IDS)
    metrics = evaluate_coco(coco_gt, results)
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        for name in METRIC_NAMES:  # every bucket holds objects, so every metric is defined
            assert metrics[iou_type][name] == pytest.approx(1.0, abs=1e-6), (iou_type, name)


def test_degraded_predictions_score_below_one(coco_gt):
    image_ids = coco_gt.getImgIds()
    halved = [_subset(_gt_prediction(coco_gt, i), slice(0, None, 2)) for i in image_ids]
    metrics = evaluate_coco(coco_gt, coco_results(halved, image_ids, label_to_cat_id))
    assert metrics["bbox"]["AP"] < 0.75 and metrics["segm"]["AP"] < 0.75

    shifted = [_gt_prediction(coco_gt, i) for i in image_ids]
    for pred in shifted:
        pred["boxes"] = pred["boxes"] + 4.0
    metrics = evaluate_coco(coco_gt, coco_results(shifted, image_ids, label_to_cat_id))
    assert metrics["bbox"]["AP75"] < 0.9
    assert metrics["segm"]["AP75"] == pytest.approx(1.0)  # masks are untouched: segm AP comes from masks alone

    wrong_class = [_gt_prediction(coco_gt, i) for i in image_ids]
    for pred in wrong_class:
        pred["labels"] = pred["labels"] % 3 + 1
    assert evaluate_coco(coco_gt, coco_results(wrong_class, image_ids, label_to_cat_id))["bbox"]["AP"] == 0.0


def test_image_ids_restrict_evaluation_and_empty_buckets_are_nan(coco_gt):
    # perfect on images 11 and 12, nothing on image 13: restricted to 11 and 12 that is still perfect
    results = coco_results([_gt_prediction(coco_gt, i) for i in (11, 12)], [11, 12], label_to_cat_id)
    metrics = evaluate_coco(coco_gt, results, image_ids=[11, 12])
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    assert math.isnan(metrics["bbox"]["APl"]) and math.isnan(metrics["segm"]["APl"])  # no large object there
    assert evaluate_coco(coco_gt, results)["bbox"]["AP"] < 0.9  # image 13's objects are missed
    with pytest.raises(EffdlError, match="not in the ground truth"):
        evaluate_coco(coco_gt, results, image_ids=[11, 99])


def test_coco_results_boxes_masks_and_json(coco_gt):
    masks = torch.rand(3, 1, 20, 30)
    pred = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 7.0], [0.0, 0.0, 30.0, 20.0], [5.5, 4.0, 6.5, 9.0]]),
            "labels": torch.tensor([1, 3, 2]), "scores": torch.tensor([0.2, 0.9, 0.5]), "masks": masks}
    results = coco_results([pred], [11], label_to_cat_id, mask_threshold=0.6)
    json.dumps(results)
    assert [r["score"] for r in results] == pytest.approx([0.9, 0.5, 0.2])  # sorted by score
    assert [r["category_id"] for r in results] == [7, 5, 2]
    assert [r["bbox"] for r in results] == [[0.0, 0.0, 30.0, 20.0], [5.5, 4.0, 1.0, 5.0], [1.0, 2.0, 10.0, 5.0]]
    assert all(r["image_id"] == 11 and isinstance(r["segmentation"]["counts"], str) for r in results)
    decoded = mask_utils.decode([r["segmentation"] for r in results])  # [H, W, N]
    expected = (masks[[1, 2, 0], 0] > 0.6).numpy().transpose(1, 2, 0)
    np.testing.assert_array_equal(decoded, expected)


def test_coco_results_top_100_and_bad_input():
    n = COCO_MAX_DETS + 50
    scores = torch.rand(n)
    pred = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]).repeat(n, 1), "labels": torch.ones(n, dtype=torch.int64),
            "scores": scores}
    results = coco_results([pred, _subset(pred, slice(0, 3))], [1, 2], label_to_cat_id)
    top = [r["score"] for r in results if r["image_id"] == 1]
    assert top == pytest.approx(scores.sort(descending=True).values[:COCO_MAX_DETS].tolist())
    assert sum(r["image_id"] == 2 for r in results) == 3
    assert "segmentation" not in results[0]
    with pytest.raises(EffdlError, match="2 image ids"):
        coco_results([pred], [1, 2], label_to_cat_id)
    with pytest.raises(EffdlError, match="boxes"):
        coco_results([{**pred, "boxes": pred["boxes"][:5]}], [1], label_to_cat_id)


def test_empty_results_and_boxes_only(coco_gt):
    metrics = evaluate_coco(coco_gt, [])
    assert metrics == {t: dict.fromkeys(METRIC_NAMES, 0.0) for t in ("bbox", "segm")}

    image_ids = coco_gt.getImgIds()
    results = coco_results([_gt_prediction(coco_gt, i, masks=False) for i in image_ids], image_ids, label_to_cat_id)
    assert evaluate_coco(coco_gt, results, iou_types=("bbox",))["bbox"]["AP"] == pytest.approx(1.0)
    with pytest.raises(EffdlError, match="segmentation"):
        evaluate_coco(coco_gt, results)
    with pytest.raises(EffdlError, match="iou_types"):
        evaluate_coco(coco_gt, results, iou_types=("keypoints",))
    with pytest.raises(EffdlError, match="not in the ground truth"):
        evaluate_coco(coco_gt, [{**results[0], "category_id": 3}])


class FakeDataset:
    """The CocoInstances interface over a hand-made COCO; each image carries its id in pixel (0, 0, 0)."""

    def __init__(self, coco: COCO, image_ids: list[int]):
        self.coco, self.image_ids, self.category_names = coco, image_ids, CAT_NAMES

    def label_to_cat_id(self, label: int) -> int:
        return label_to_cat_id(label)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int):
        info = self.coco.imgs[self.image_ids[i]]
        image = torch.full((3, info["height"], info["width"]), 0.5)
        image[0, 0, 0] = info["id"] / 255
        return image, {"image_id": info["id"]}


class OracleModel(nn.Module):
    """Returns the ground truth of the image it is shown (in eval mode, as a torchvision detector would)."""

    def __init__(self, coco: COCO, masks: bool = True, empty: bool = False):
        super().__init__()
        self.coco, self.masks, self.empty = coco, masks, empty

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        assert not self.training and not torch.is_grad_enabled()
        preds = [_gt_prediction(self.coco, round(image[0, 0, 0].item() * 255), self.masks) for image in images]
        return [_subset(p, slice(0, 0)) if self.empty else p for p in preds]


def test_predict_dataset_and_evaluate_model(coco_gt):
    dataset = FakeDataset(coco_gt, [13, 11, 12])
    model = OracleModel(coco_gt).train()
    results = predict_dataset(model, dataset, batch_size=2, progress=False)
    assert model.training  # mode restored
    assert [r["image_id"] for r in results[:3]] == [13, 13, 13]
    metrics = evaluate_model(model, dataset, batch_size=2, progress=False)
    assert set(metrics) == {"bbox", "segm"}
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)

    # the dataset's images only: a subset without image 13 is still perfect
    metrics = evaluate_model(model, FakeDataset(coco_gt, [11, 12]), batch_size=4, progress=False)
    assert metrics["segm"]["AP"] == pytest.approx(1.0) and math.isnan(metrics["segm"]["APl"])

    retinanet = evaluate_model(OracleModel(coco_gt, masks=False), dataset, progress=False)
    assert set(retinanet) == {"bbox"} and retinanet["bbox"]["AP"] == pytest.approx(1.0)
    # a mask model that finds nothing still gets a segm row
    empty = evaluate_model(OracleModel(coco_gt, empty=True), dataset, progress=False)
    assert empty == {t: dict.fromkeys(METRIC_NAMES, 0.0) for t in ("bbox", "segm")}


def test_format_metrics():
    metrics = {"bbox": {"AP": 0.4532, "AP50": 0.7, "AP75": 0.0, "APs": math.nan, "APm": 1.0, "APl": 0.12345},
               "segm": dict.fromkeys(METRIC_NAMES, 0.25)}
    assert format_metrics(metrics) == [("bbox", "45.3", "70.0", "0.0", "-", "100.0", "12.3"),
                                       ("segm", "25.0", "25.0", "25.0", "25.0", "25.0", "25.0")]
    with pytest.raises(EffdlError, match="APl"):
        format_metrics({"bbox": {"AP": 0.1}})


def _overlay_prediction(score: float, masks: bool = True) -> dict[str, torch.Tensor]:
    pred = {"boxes": torch.tensor([[4.0, 4.0, 50.0, 40.0]]), "labels": torch.tensor([3]),
            "scores": torch.tensor([score])}
    if masks:
        pred["masks"] = torch.zeros(1, 1, 48, 64)
        pred["masks"][0, 0, 16:36, 8:44] = 0.9
    return pred


def test_draw_overlay_and_save(tmp_path):
    image = torch.full((3, 48, 64), 0.5)
    base = draw_overlay(image, _overlay_prediction(0.3), CAT_NAMES)  # below threshold: nothing drawn
    assert base.dtype == torch.uint8 and base.shape == (3, 48, 64)
    assert torch.equal(base, torch.full((3, 48, 64), 128, dtype=torch.uint8))

    drawn = draw_overlay(image, _overlay_prediction(0.93), CAT_NAMES)
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, 48, 64)
    assert (drawn[:, 24:30, 14:30] != base[:, 24:30, 14:30]).any(dim=0).all()  # inside the mask
    assert torch.equal(drawn[:, 44:, 56:], base[:, 44:, 56:])  # far from mask and box

    boxes_only = draw_overlay(image, _overlay_prediction(0.93, masks=False), CAT_NAMES)
    assert torch.equal(boxes_only[:, 24:30, 14:30], base[:, 24:30, 14:30])  # box outline only
    assert not torch.equal(boxes_only, base)
    none = {k: v[:0] for k, v in _overlay_prediction(0.9).items()}
    assert torch.equal(draw_overlay(image, none, CAT_NAMES), base)
    with pytest.raises(EffdlError, match="labels"):
        draw_overlay(image, _overlay_prediction(0.9), CAT_NAMES[:2])

    path = tmp_path / "a" / "b" / "overlay.png"
    save_overlay(path, drawn)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert torch.equal(torch.from_numpy(np.array(png)).permute(2, 0, 1), drawn)
    with pytest.raises(EffdlError, match="uint8"):
        save_overlay(path, image)
