import json
import re
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from effdl.errors import EffdlError
from effdl.sprnet.data import SHAPE_CATEGORIES, CocoInstances, collate, load_image, write_shapes_dataset

SIZE = 128
# pycocotools' decoder trips a numpy 2 deprecation on every call; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """200 synthetic images at 128 px (~2 s), shared by the generator and dataset tests."""
    root = tmp_path_factory.mktemp("shapes")
    ann_file = write_shapes_dataset(root, num_images=200, image_size=SIZE, seed=0)
    return root, json.loads(ann_file.read_text())


def _decode(ann, height=SIZE, width=SIZE):
    seg = ann["segmentation"]
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width)) if isinstance(seg, list) else seg
    return mask_utils.decode(rle).astype(bool)


def _tight_box(mask):
    """xyxy pixel box of a boolean [H, W] mask, right/bottom edges exclusive."""
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


# --------------------------------------------------------------------------- generator


def test_generator_is_deterministic_per_seed_and_split(tmp_path):
    def write(name, seed, split="train"):
        return write_shapes_dataset(tmp_path / name, split=split, num_images=12, image_size=64, seed=seed).read_bytes()

    first = write("a", 3)
    assert write("b", 3) == first
    assert write("c", 4) != first
    assert write("d", 3, split="val") != first


def test_generator_layout(tmp_path):
    ann_file = write_shapes_dataset(tmp_path, split="val", num_images=5, image_size=64)
    assert ann_file == tmp_path / "annotations" / "instances_val.json"
    data = json.loads(ann_file.read_text())
    assert {"info", "images", "annotations", "categories"} <= data.keys()
    assert [(c["id"], c["name"]) for c in data["categories"]] == list(SHAPE_CATEGORIES)
    assert [im["file_name"] for im in data["images"]] == [f"{i:06d}.png" for i in range(1, 6)]
    for im in data["images"]:
        with Image.open(tmp_path / "val" / im["file_name"]) as image:
            assert image.size == (im["width"], im["height"]) == (64, 64) and image.mode == "RGB"


def test_generator_covers_formats_buckets_and_empty_images(shapes):
    _, data = shapes
    anns = data["annotations"]
    assert any(isinstance(a["segmentation"], list) for a in anns)
    assert any(isinstance(a["segmentation"], dict) for a in anns)
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas <= 96**2)).any() and (areas > 96**2).any()
    assert areas.min() >= 20
    annotated = {a["image_id"] for a in anns}
    assert 0 < len(data["images"]) - len(annotated) < 30  # ~5% of images have no shapes
    assert {a["category_id"] for a in anns} == {cat_id for cat_id, _ in SHAPE_CATEGORIES}


def test_generator_masks_are_visible_parts(shapes):
    root, data = shapes
    by_image = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    occluded_polygon_shapes = 0
    for image_id, anns in list(by_image.items())[:80]:
        masks = [_decode(a) for a in anns]
        pixels = np.asarray(Image.open(root / "train" / f"{image_id:06d}.png"), dtype=np.float32)
        for i, (ann, mask) in enumerate(zip(anns, masks, strict=True)):
            assert ann["iscrowd"] == 0
            assert ann["area"] == mask.sum()
            x0, y0, x1, y1 = _tight_box(mask)
            assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            # Annotations are in drawing order: no later shape may cover what is annotated as visible.
            for later in masks[i + 1:]:
                assert not (mask & later).any()
            # The mask covers one flat-coloured shape (plus noise), not background texture.
            colours = pixels[mask]
            assert np.abs(colours - np.median(colours, axis=0)).mean() < 12
            occluded_polygon_shapes += ann["category_id"] in (2, 3, 5) and isinstance(ann["segmentation"], dict)
    assert occluded_polygon_shapes > 0


def test_generator_rejects_bad_arguments(tmp_path):
    with pytest.raises(EffdlError, match="num_images"):
        write_shapes_dataset(tmp_path, num_images=0)
    with pytest.raises(EffdlError, match="split"):
        write_shapes_dataset(tmp_path, split="a/b")


# --------------------------------------------------------------------------- dataset on synthetic shapes


def test_sample_shapes_and_dtypes(shapes):
    root, data = shapes
    ds = CocoInstances(root)
    assert len(ds) == 200 and ds.num_classes == 6
    assert ds.category_names == [name for _, name in SHAPE_CATEGORIES]
    image, target = ds[0]
    n = len([a for a in data["annotations"] if a["image_id"] == ds.image_ids[0]])
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (n,) and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (n, SIZE, SIZE) and target["masks"].dtype == torch.uint8
    assert target["image_id"].shape == () and target["image_id"].dtype == torch.int64
    assert target["area"].dtype == torch.float32 and target["iscrowd"].dtype == torch.int64
    assert target["area"].shape == target["iscrowd"].shape == (n,)


def test_boxes_match_masks(shapes):
    root, _ = shapes
    ds = CocoInstances(root)
    for i in range(10):
        _, target = ds[i]
        for box, mask in zip(target["boxes"], target["masks"], strict=True):
            assert torch.allclose(box, torch.tensor(_tight_box(mask.numpy().astype(bool)), dtype=torch.float32),
                                  atol=1.0)
        assert torch.equal(target["area"], target["masks"].sum((1, 2)).float())


def test_image_without_annotations(shapes):
    root, data = shapes
    ds = CocoInstances(root)
    empty_id = min({im["id"] for im in data["images"]} - {a["image_id"] for a in data["annotations"]})
    _, target = ds[ds.image_ids.index(empty_id)]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, SIZE, SIZE) and target["masks"].dtype == torch.uint8
    assert int(target["image_id"]) == empty_id


def test_hflip_matches_manual_flip(shapes):
    root, _ = shapes
    plain, flipped = CocoInstances(root), CocoInstances(root, train=True, hflip_prob=1.0)
    image, target = plain[1]
    image_f, target_f = flipped[1]
    assert len(target["boxes"]) > 0
    assert torch.equal(image_f, image.flip(-1))
    assert torch.equal(target_f["masks"], target["masks"].flip(-1))
    x0, y0, x1, y1 = target["boxes"].unbind(1)
    assert torch.equal(target_f["boxes"], torch.stack([SIZE - x1, y0, SIZE - x0, y1], 1))
    assert torch.equal(target_f["labels"], target["labels"])
    # Boxes still enclose their flipped masks.
    for box, mask in zip(target_f["boxes"], target_f["masks"], strict=True):
        assert torch.allclose(box, torch.tensor(_tight_box(mask.numpy().astype(bool)), dtype=torch.float32))
    never = CocoInstances(root, train=True, hflip_prob=0.0)
    assert torch.equal(never[1][0], image)


def test_collate_returns_lists(shapes):
    root, _ = shapes
    ds = CocoInstances(root)
    images, targets = collate([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
    assert torch.equal(images[1], ds[1][0])


def test_head_is_the_first_images_and_leaves_the_dataset_whole(shapes):
    root, _ = shapes
    ds = CocoInstances(root)
    first = ds.head(3)
    assert len(first) == 3 and first.image_ids == ds.image_ids[:3] and len(ds) == 200
    assert torch.equal(first[2][1]["boxes"], ds[2][1]["boxes"])
    assert len(ds.head(0)) == len(ds.head(10_000)) == 200


# --------------------------------------------------------------------------- hand-made COCO files

H, W = 24, 32


def _rect_mask(x0, y0, x1, y1):
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _tiny(root):
    """Four images (RGB, grayscale, RGBA, palette) and non-contiguous category ids 17 and 3; returns the json."""
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "train" / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)).save(root / "train" / "gray.png")
    rgba = np.full((H, W, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:, : W // 2, 3] = 0  # left half transparent
    Image.fromarray(rgba).save(root / "train" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).convert("P").save(root / "train" / "pal.png")
    polygon = [[2, 2, 12, 2, 12, 10, 2, 10]]
    rle_mask, crowd_mask = _rect_mask(20, 14, 30, 20), _rect_mask(0, 12, 8, 24)

    polygon_mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, H, W)))

    def ann(ann_id, image_id, cat_id, segmentation, mask, iscrowd=0):
        x0, y0, x1, y1 = _tight_box(mask)
        return {"id": ann_id, "image_id": image_id, "category_id": cat_id, "segmentation": segmentation,
                "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)], "area": int(mask.sum()), "iscrowd": iscrowd}

    data = {
        "images": [{"id": i, "file_name": name, "width": W, "height": H}
                   for i, name in enumerate(["rgb.png", "gray.png", "rgba.png", "pal.png"], start=1)],
        "annotations": [ann(10, 1, 17, polygon, polygon_mask), ann(11, 1, 3, _rle(rle_mask), rle_mask),
                        ann(12, 1, 3, _rle(crowd_mask), crowd_mask, iscrowd=1), ann(13, 2, 17, polygon, polygon_mask)],
        "categories": [{"id": 17, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    _write(root, data)
    return data


def _write(root, data):
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))


def test_noncontiguous_categories_and_crowd(tmp_path):
    _tiny(tmp_path)
    ds = CocoInstances(tmp_path)
    assert ds.cat_ids == [3, 17] and ds.category_names == ["cat", "dog"] and ds.num_classes == 3
    assert ds.cat_id_to_label == {3: 1, 17: 2}
    assert [ds.label_to_cat_id(label) for label in (1, 2)] == [3, 17]
    with pytest.raises(EffdlError, match="label 3"):
        ds.label_to_cat_id(3)
    _, target = ds[0]
    assert target["labels"].tolist() == [2, 1]  # crowd annotation 12 left out
    assert target["iscrowd"].tolist() == [0, 0]
    assert torch.equal(target["masks"][1], torch.from_numpy(_rect_mask(20, 14, 30, 20)))
    assert target["boxes"][1].tolist() == [20, 14, 30, 20]
    polygon_mask = target["masks"][0].bool()
    assert (polygon_mask.sum() / torch.from_numpy(_rect_mask(2, 2, 12, 10)).bool().sum()).item() == pytest.approx(
        1.0, abs=0.3)
    assert torch.allclose(target["boxes"][0], torch.tensor([2.0, 2.0, 12.0, 10.0]), atol=1.0)


def test_grayscale_rgba_and_palette_load_as_rgb(tmp_path):
    _tiny(tmp_path)
    ds = CocoInstances(tmp_path)
    for i in range(4):
        assert ds[i][0].shape == (3, H, W)
    gray = ds[1][0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgba = ds[2][0]
    assert (rgba[:, :, : W // 2] == 0).all()  # transparent: composited over black
    assert torch.allclose(rgba[:, :, W // 2:], torch.tensor(200 / 255))
    assert ds[3][1]["boxes"].shape == (0, 4)


def test_load_image(tmp_path):
    _tiny(tmp_path)
    image = load_image(tmp_path / "train" / "rgb.png")
    assert image.shape == (3, H, W) and image.dtype == torch.float32 and image.is_contiguous()
    with pytest.raises(EffdlError, match=r"image file .*nope\.png does not exist"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(EffdlError, match=r"cannot read image .*junk\.png"):
        load_image(tmp_path / "junk.png")


# --------------------------------------------------------------------------- bad input, caught up front


def _drop(entries, entry_id, field):
    del next(e for e in entries if e["id"] == entry_id)[field]


def _set(entries, entry_id, field, value):
    next(e for e in entries if e["id"] == entry_id)[field] = value


BAD_JSON = {
    "no categories": (lambda d: d.pop("categories"), r"missing top-level field 'categories'"),
    "no images": (lambda d: d.update(images=[], annotations=[]), r"lists no images"),
    "image field": (lambda d: _drop(d["images"], 2, "file_name"), r"image id=2 has no 'file_name' field"),
    "image size": (lambda d: _set(d["images"], 2, "height", 0), r"image id=2 \(gray\.png\) has height 0"),
    "annotation field": (lambda d: _drop(d["annotations"], 11, "bbox"), r"annotation id=11 has no 'bbox' field"),
    "segmentation field": (lambda d: _drop(d["annotations"], 13, "segmentation"),
                           r"annotation id=13 has no 'segmentation' field"),
    "unknown category": (lambda d: _set(d["annotations"], 11, "category_id", 99),
                         r"annotation id=11 has category_id 99, which is not among the categories \(3, 17\)"),
    "unknown image": (lambda d: _set(d["annotations"], 13, "image_id", 42),
                      r"annotation id=13 has image_id 42, which is not an image"),
    "degenerate box": (lambda d: _set(d["annotations"], 11, "bbox", [20, 14, 0, 6]),
                       r"Found invalid box \[20, 14, 0, 6\] for image rgb\.png \(annotation id=11\)"),
    "duplicate id": (lambda d: _set(d["annotations"], 13, "id", 10), r"annotation id 10 appears twice"),
    "rle size": (lambda d: _set(d["annotations"], 11, "segmentation", {"size": [5, 5], "counts": "25"}),
                 r"segmentation of annotation id=11 is RLE of size \[5, 5\]"),
    "bad polygon": (lambda d: _set(d["annotations"], 13, "segmentation", [[1, 2, 3]]),
                    r"segmentation of annotation id=13 is neither RLE nor a list of polygons"),
    "missing file": (lambda d: _set(d["images"], 3, "file_name", "gone.png"),
                     r"image file .*gone\.png \(image id=3\) does not exist"),
}


@pytest.mark.parametrize("case", BAD_JSON)
def test_bad_annotation_file(tmp_path, case):
    data = _tiny(tmp_path)
    mutate, message = BAD_JSON[case]
    mutate(data)
    _write(tmp_path, data)
    with pytest.raises(EffdlError, match=message):
        CocoInstances(tmp_path)


def test_crowd_box_may_be_degenerate(tmp_path):
    data = _tiny(tmp_path)
    _set(data["annotations"], 12, "bbox", [0, 12, 0, 12])
    _write(tmp_path, data)
    assert len(CocoInstances(tmp_path)[0][1]["labels"]) == 2


def test_missing_annotation_file_lists_the_folder(tmp_path):
    _tiny(tmp_path)
    with pytest.raises(EffdlError, match=r"instances_val\.json does not exist; .* contains: annotations/, train/"
                                         r"; .*annotations contains: instances_train\.json"):
        CocoInstances(tmp_path, split="val")
    with pytest.raises(EffdlError, match=r"dataset folder .*nowhere does not exist"):
        CocoInstances(tmp_path / "nowhere")


def test_explicit_paths(tmp_path):
    _tiny(tmp_path)
    ds = CocoInstances(tmp_path / "unused", "val2017", ann_file=tmp_path / "annotations" / "instances_train.json",
                       image_dir=tmp_path / "train")
    assert len(ds) == 4


def test_missing_or_empty_image_folder(tmp_path):
    _tiny(tmp_path)
    ann_file = tmp_path / "annotations" / "instances_train.json"
    with pytest.raises(EffdlError, match=r"image folder .*nowhere does not exist"):
        CocoInstances(tmp_path, image_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EffdlError, match=r"image folder .*empty is empty"):
        CocoInstances(tmp_path, ann_file=ann_file, image_dir=tmp_path / "empty")


def test_invalid_json(tmp_path):
    _tiny(tmp_path)
    ann_file = tmp_path / "annotations" / "instances_train.json"
    ann_file.write_text('{"images": [')
    with pytest.raises(EffdlError, match=re.escape(f"annotation file {ann_file} is not valid JSON")):
        CocoInstances(tmp_path)
    ann_file.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(EffdlError, match="is not valid JSON"):
        CocoInstances(tmp_path)


def test_corrupt_or_resized_image_fails_naming_the_file(tmp_path):
    _tiny(tmp_path)
    ds = CocoInstances(tmp_path)
    (tmp_path / "train" / "gray.png").write_bytes(b"truncated")
    with pytest.raises(EffdlError, match=r"cannot read image .*gray\.png"):
        ds[1]
    Image.new("RGB", (W + 1, H)).save(tmp_path / "train" / "rgb.png")
    with pytest.raises(EffdlError, match=r"rgb\.png is 33x24 pixels but .* says 32x24"):
        ds[0]
