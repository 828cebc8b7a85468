"""Instance-segmentation data for SPRNet: a synthetic-shapes generator and a COCO-format dataset.

``write_shapes_dataset`` draws seeded images of circles, squares, triangles, ellipses and stars on textured
backgrounds and writes them in the COCO-2017 layout (``root/{split}/*.png`` and
``root/annotations/instances_{split}.json``), so the same loader reads the toy data and real COCO.

``CocoInstances`` reads any COCO-format folder with pycocotools and yields torchvision-detection-style samples: a
float image in [0, 1] and a target dict of ``boxes`` (xyxy pixels), ``labels`` (1..K, 0 is background), ``masks``,
``image_id``, ``area`` and ``iscrowd``. Everything that can be checked without decoding images is checked when the
dataset is built, so a bad annotation file fails at once rather than halfway through an epoch.
"""

from __future__ import annotations

import colorsys
import contextlib
import copy
import io
import json
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from rich.progress import track
from torch import Tensor
from torch.utils.data import Dataset

from effdl.errors import EffdlError
from effdl.progress import console

Target = dict[str, Tensor]

# (COCO category id, name) of the synthetic shapes.
SHAPE_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "circle"), (2, "square"), (3, "triangle"), (4, "ellipse"), (5, "star"),
)
_POLYGON_SHAPES = {"square", "triangle", "star"}
_EMPTY_IMAGE_PROB = 0.05  # images drawn with no shapes, so training sees pure background too
_MIN_VISIBLE_AREA = 20  # pixels; a shape occluded below this is not annotated
_MIN_SHAPE_AREA = 36  # pixels, before clipping and occlusion
_MAX_SHAPE_AREA_FRACTION = 0.8  # of the image; sizes are log-uniform in between
_PROGRESS_MIN_IMAGES = 500


# --------------------------------------------------------------------------- synthetic shapes


def write_shapes_dataset(root: str | Path, split: str = "train", num_images: int = 200, image_size: int = 128,
                         seed: int = 0, max_objects: int = 6) -> Path:
    """Write a synthetic-shapes instance-segmentation dataset in COCO format and return its annotation file.

    Images go to ``root/{split}/{image_id:06d}.png`` (ids from 1) and annotations to
    ``root/annotations/instances_{split}.json``. Each image has 0..``max_objects`` shapes of random colour,
    rotation and log-uniform size (spanning COCO's small, medium and large area buckets when ``image_size`` allows
    it) over a textured background. Shapes are painted in order, so later ones occlude earlier ones; an
    annotation's mask, ``area`` and ``bbox`` describe the visible part only, and shapes with fewer than 20 visible
    pixels are not annotated. An unoccluded square, triangle or star is stored as a COCO polygon, everything else as
    compressed RLE, so both segmentation formats occur; either decodes with pycocotools to exactly the painted pixels.

    The output depends only on the arguments: the same seed gives a byte-identical annotation file, and each split
    draws from its own random stream.
    """
    if num_images < 1:
        raise EffdlError(f"num_images must be at least 1, got {num_images}")
    if image_size < 16:
        raise EffdlError(f"image_size must be at least 16 pixels, got {image_size}")
    if max_objects < 0:
        raise EffdlError(f"max_objects must be non-negative, got {max_objects}")
    if not split or "/" in split or "\\" in split:
        raise EffdlError(f"split must be a plain folder name such as 'train', got {split!r}")
    root = Path(root)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    # crc32, not hash(): Python salts str hashes per process, which would break reproducibility.
    rng = np.random.default_rng([seed % 2**64, zlib.crc32(split.encode())])

    images, annotations = [], []
    image_ids = range(1, num_images + 1)
    if num_images >= _PROGRESS_MIN_IMAGES:
        image_ids = track(image_ids, description=f"shapes {split}", console=console)
    for image_id in image_ids:
        pixels, shapes = _draw_image(rng, image_size, max_objects)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for category_id, visible, polygon in shapes:
            annotations.append(_shape_annotation(len(annotations) + 1, image_id, category_id, visible, polygon))

    dataset = {
        "info": {"description": "effdl SPRNet synthetic shapes", "split": split, "seed": seed,
                 "image_size": image_size},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cat_id, "name": name, "supercategory": "shape"} for cat_id, name in SHAPE_CATEGORIES],
    }
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.write_text(json.dumps(dataset, separators=(",", ":")))
    return ann_file


def _draw_image(rng: np.random.Generator, size: int,
                max_objects: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray, np.ndarray | None]]]:
    """One image (uint8 [size, size, 3]) and its annotated shapes as (category id, visible mask, polygon or None).

    The polygon is given only for unoccluded polygon shapes; it decodes to exactly the visible mask.
    """
    canvas = _background(rng, size)
    owner = np.zeros((size, size), np.int32)  # 1 + index of the shape painted last at each pixel; 0 = background
    drawn = []
    empty = max_objects == 0 or rng.random() < _EMPTY_IMAGE_PROB
    for index in range(0 if empty else int(rng.integers(1, max_objects + 1))):
        kind = int(rng.integers(len(SHAPE_CATEGORIES)))
        category_id, name = SHAPE_CATEGORIES[kind]
        mask, polygon = _random_shape(rng, name, size)
        canvas[mask] = _shape_colour(rng, kind)
        owner[mask] = index + 1
        drawn.append((category_id, mask, polygon))

    shapes = []
    for index, (category_id, mask, polygon) in enumerate(drawn):
        visible = owner == index + 1
        if visible.sum() < _MIN_VISIBLE_AREA:
            continue
        occluded = visible.sum() != mask.sum()
        shapes.append((category_id, visible, None if occluded else polygon))

    # Sensor-like noise over shapes and background alike, so flat colour alone does not give shapes away.
    canvas += rng.normal(0.0, rng.uniform(2.0, 8.0), canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8), shapes


def _shape_colour(rng: np.random.Generator, kind: int) -> np.ndarray:
    """An RGB colour from shape class ``kind``'s hue family (hue kind / 5 +- 0.05; saturation and value vary).

    Why: with colours unrelated to the class, a small detector trained for minutes on a CPU localises shapes well but
    labels them at chance (tiny stars and circles look alike), which would hide the mask-quality comparison the data
    exists for. Masks and boxes still have to follow the shape.
    """
    hue = (kind / len(SHAPE_CATEGORIES) + rng.uniform(-0.05, 0.05)) % 1.0
    return 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0)))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured float [size, size, 3] background: a colour gradient plus stripes or a checkerboard plus noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(angle) * x + np.sin(angle) * y
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    start, end = rng.uniform(0, 255, (2, 3))
    image = start + ramp[..., None] * (end - start)

    period = rng.uniform(4, size / 4)
    if rng.random() < 0.5:
        stripe_angle = rng.uniform(0, math.pi)
        pattern = ((np.cos(stripe_angle) * x + np.sin(stripe_angle) * y) / period) % 1.0 < 0.5
    else:
        pattern = ((x // period + y // period) % 2).astype(bool)
    image += pattern[..., None] * rng.uniform(-40, 40, 3)
    return image + rng.normal(0.0, rng.uniform(2.0, 12.0), image.shape)


def _random_shape(rng: np.random.Generator, name: str, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A random shape's boolean mask [size, size] and, for polygon shapes, its vertices [V, 2] in COCO coordinates."""
    max_area = _MAX_SHAPE_AREA_FRACTION * size * size
    area = math.exp(rng.uniform(math.log(_MIN_SHAPE_AREA), math.log(max_area)))
    cx, cy = rng.uniform(0.1 * size, 0.9 * size, 2)
    if name in _POLYGON_SHAPES:
        unit = _unit_polygon(name, rng.uniform(0, 2 * math.pi))
        # Rounded for a compact annotation file; the mask is drawn from the rounded coordinates.
        polygon = np.round(unit * math.sqrt(area / _polygon_area(unit)) + (cx, cy), 2)
        # Rasterised by pycocotools, not PIL: annToMask decodes the stored polygon with the same code, so the
        # annotation covers exactly the painted pixels (PIL also fills the boundary, ~10% more area at these sizes).
        mask = mask_utils.decode(mask_utils.frPyObjects([polygon.ravel().tolist()], size, size))[..., 0]
        return mask.astype(bool), polygon
    canvas = Image.new("1", (size, size))
    aspect = 1.0 if name == "circle" else rng.uniform(0.35, 0.75)
    rx = math.sqrt(area / (math.pi * aspect))
    ry = rx * aspect
    if rng.random() < 0.5:
        rx, ry = ry, rx
    ImageDraw.Draw(canvas).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=1)
    return np.array(canvas), None


def _unit_polygon(name: str, rotation: float) -> np.ndarray:
    """Vertices [V, 2] of a polygon shape with circumradius 1, rotated by ``rotation`` radians."""
    # A five-point star alternates outer and inner (0.45) radii.
    radii = np.tile([1.0, 0.45], 5) if name == "star" else np.ones(4 if name == "square" else 3)
    angles = rotation + 2 * math.pi * np.arange(len(radii)) / len(radii)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _polygon_area(vertices: np.ndarray) -> float:
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _shape_annotation(ann_id: int, image_id: int, category_id: int, visible: np.ndarray,
                      polygon: np.ndarray | None) -> dict[str, Any]:
    ys, xs = np.nonzero(visible)
    x0, y0 = int(xs.min()), int(ys.min())
    bbox = [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]
    if polygon is not None:
        segmentation: Any = [polygon.ravel().tolist()]
    else:
        segmentation = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        segmentation["counts"] = segmentation["counts"].decode("ascii")
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "area": float(visible.sum()), "bbox": bbox, "iscrowd": 0}


# --------------------------------------------------------------------------- COCO-format dataset


def load_image(path: str | Path) -> Tensor:
    """Read an image file as an RGB float32 tensor [3, H, W] in [0, 1].

    Grayscale, palette and CMYK images are converted to RGB; images with transparency are composited over black.
    """
    path = Path(path)
    if not path.is_file():
        raise EffdlError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError) as e:
        raise EffdlError(f"cannot read image {path}: {e}") from None
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA"))
    pixels = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous().float().div_(255)


class CocoInstances(Dataset):
    """A COCO-format instance-segmentation dataset yielding ``(image, target)`` in torchvision-detection style.

    By default reads ``root/annotations/instances_{split}.json`` with images in ``root/{split}/``, which matches both
    ``write_shapes_dataset`` and real COCO-2017 (``split="val2017"``); ``ann_file`` and ``image_dir`` override the
    two paths (taken as given, not relative to ``root``).

    A sample is a float32 image [3, H, W] in [0, 1] and a target with ``boxes`` float32 [N, 4] (xyxy pixels),
    ``labels`` int64 [N] in 1..K (0 is background), ``masks`` uint8 [N, H, W], ``image_id`` int64 scalar,
    ``area`` float32 [N] and ``iscrowd`` int64 [N]. Labels follow the sorted COCO category ids, which need not be
    contiguous. Crowd annotations (``iscrowd=1``) are left out: they mark a group of objects as one region, not an
    instance, and COCO evaluation ignores detections on them instead of scoring them. Images without annotations
    give empty targets and train as pure background.

    Images keep their size; the model's transform resizes them. With ``train=True`` a sample is flipped
    horizontally with probability ``hflip_prob``, drawn from torch's global RNG so DataLoader worker seeding
    applies.
    """

    def __init__(self, root: str | Path, split: str = "train", *, ann_file: str | Path | None = None,
                 image_dir: str | Path | None = None, train: bool = False, hflip_prob: float = 0.5):
        if not 0.0 <= hflip_prob <= 1.0:
            raise EffdlError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        root = Path(root)
        self.ann_file = Path(ann_file) if ann_file is not None else root / "annotations" / f"instances_{split}.json"
        self.image_dir = Path(image_dir) if image_dir is not None else root / split
        self.train = train
        self.hflip_prob = hflip_prob

        data = _read_annotation_file(self.ann_file, root)
        _check_fields(data, self.ann_file)
        _check_unique_ids(data, self.ann_file)
        _check_references(data, self.ann_file)
        _check_boxes(data, self.ann_file)
        _check_segmentations(data, self.ann_file)
        _check_image_files(data["images"], self.image_dir, self.ann_file)

        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress chatter
            self.coco.createIndex()
        self.image_ids: list[int] = sorted(self.coco.imgs)
        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.category_names: list[str] = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.cat_id_to_label: dict[int, int] = {cat_id: i + 1 for i, cat_id in enumerate(self.cat_ids)}
        self.num_classes = len(self.cat_ids) + 1

    def head(self, n: int) -> CocoInstances:
        """The first ``n`` images (all if ``n`` is 0 or more than there are), sharing this dataset's index."""
        subset = copy.copy(self)
        subset.image_ids = self.image_ids[:n] if n > 0 else list(self.image_ids)
        return subset

    def label_to_cat_id(self, label: int) -> int:
        """The COCO category id of contiguous label ``label`` (1..K)."""
        if not 1 <= label <= len(self.cat_ids):
            raise EffdlError(f"label {label} is out of range: labels run from 1 to {len(self.cat_ids)}")
        return self.cat_ids[label - 1]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        image = load_image(path)
        height, width = info["height"], info["width"]
        if image.shape[1:] != (height, width):
            raise EffdlError(f"image {path} is {image.shape[2]}x{image.shape[1]} pixels but {self.ann_file} "
                             f"says {width}x{height} (image id={image_id})")
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        target = self._target(image_id, anns, height, width)
        if self.train and torch.rand(()) < self.hflip_prob:
            image, target = _hflip(image, target)
        return image, target

    def _target(self, image_id: int, anns: list[dict[str, Any]], height: int, width: int) -> Target:
        masks = [self.coco.annToMask(a) for a in anns]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        # 'area' is optional in COCO files; the mask's pixel count stands in for a missing one.
        areas = [a["area"] if "area" in a else float(m.sum()) for a, m in zip(anns, masks, strict=True)]
        return {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }


def collate(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """DataLoader collate for detection: images differ in size, so keep lists instead of stacking."""
    return [image for image, _ in batch], [target for _, target in batch]


def _hflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


# --------------------------------------------------------------------------- up-front validation

_REQUIRED_FIELDS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox", "segmentation"),
    "categories": ("id", "name"),
}
_ENTRY_NAMES = {"images": "image", "annotations": "annotation", "categories": "category"}


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return f"{folder} is empty"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{folder} contains: {', '.join(names[:limit])}{more}"


def _read_annotation_file(ann_file: Path, root: Path) -> Any:
    if not ann_file.is_file():
        if not root.is_dir():
            raise EffdlError(f"annotation file {ann_file} does not exist: the dataset folder {root} does not exist")
        where = _listing(root)
        if ann_file.parent.is_dir() and ann_file.parent.resolve() != root.resolve():
            where += f"; {_listing(ann_file.parent)}"
        raise EffdlError(f"annotation file {ann_file} does not exist; {where}")
    try:
        return json.loads(ann_file.read_bytes())
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for binary junk
        raise EffdlError(f"annotation file {ann_file} is not valid JSON ({e})") from None


def _entry(key: str, entry: dict[str, Any], index: int) -> str:
    """How an error message names an entry: by id when it has one, else by position."""
    name = _ENTRY_NAMES[key]
    return f"{name} id={entry['id']}" if "id" in entry else f"{name} #{index} in '{key}' (no id)"


def _check_fields(data: Any, ann_file: Path) -> None:
    if not isinstance(data, dict):
        raise EffdlError(f"{ann_file}: the top level must be a JSON object with images, annotations and categories")
    for key in _REQUIRED_FIELDS:
        if key not in data:
            raise EffdlError(f"{ann_file}: missing top-level field '{key}'")
        if not isinstance(data[key], list):
            raise EffdlError(f"{ann_file}: top-level field '{key}' must be a list")
    if not data["images"]:
        raise EffdlError(f"{ann_file} lists no images")
    for key, fields in _REQUIRED_FIELDS.items():
        for index, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise EffdlError(f"{ann_file}: {_ENTRY_NAMES[key]} #{index} in '{key}' is not a JSON object")
            for field in fields:
                if field not in entry:
                    raise EffdlError(f"{ann_file}: {_entry(key, entry, index)} has no '{field}' field")
    for key in _REQUIRED_FIELDS:
        for entry in data[key]:
            if not isinstance(entry["id"], int):
                raise EffdlError(f"{ann_file}: {_ENTRY_NAMES[key]} id {entry['id']!r} is not an integer")
    for image in data["images"]:
        for field in ("width", "height"):
            if not isinstance(image[field], int) or image[field] <= 0:
                raise EffdlError(f"{ann_file}: image id={image['id']} ({image['file_name']}) has {field} "
                                 f"{image[field]!r}; it must be a positive integer")
    for ann in data["annotations"]:
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
            raise EffdlError(f"{ann_file}: annotation id={ann['id']} has bbox {bbox!r}; it must be [x, y, w, h]")


def _check_unique_ids(data: dict[str, Any], ann_file: Path) -> None:
    for key in _REQUIRED_FIELDS:
        seen = set()
        for entry in data[key]:
            if entry["id"] in seen:
                raise EffdlError(f"{ann_file}: {_ENTRY_NAMES[key]} id {entry['id']} appears twice in '{key}'")
            seen.add(entry["id"])


def _check_references(data: dict[str, Any], ann_file: Path) -> None:
    image_ids = {image["id"] for image in data["images"]}
    cat_ids = {cat["id"] for cat in data["categories"]}
    for ann in data["annotations"]:
        if ann["category_id"] not in cat_ids:
            known = sorted(cat_ids)
            shown = ", ".join(map(str, known[:10])) + (", ..." if len(known) > 10 else "")
            raise EffdlError(f"{ann_file}: annotation id={ann['id']} has category_id {ann['category_id']!r}, which "
                             f"is not among the categories ({shown or 'none'})")
        if ann["image_id"] not in image_ids:
            raise EffdlError(f"{ann_file}: annotation id={ann['id']} has image_id {ann['image_id']!r}, which is not "
                             "an image in 'images'")


def _check_boxes(data: dict[str, Any], ann_file: Path) -> None:
    """Degenerate boxes break box regression, so they fail here; crowd boxes are never targets, so they may be."""
    file_names = {image["id"]: image["file_name"] for image in data["images"]}
    for ann in data["annotations"]:
        _, _, w, h = ann["bbox"]
        if (w <= 0 or h <= 0) and not ann.get("iscrowd", 0):
            raise EffdlError(f"{ann_file}: All bounding boxes should have positive height and width. Found invalid "
                             f"box {ann['bbox']} for image {file_names[ann['image_id']]} (annotation id={ann['id']})")


def _check_segmentations(data: dict[str, Any], ann_file: Path) -> None:
    """Check the shape of each segmentation (polygons or RLE) so that decoding it cannot fail mid-epoch."""
    sizes = {image["id"]: [image["height"], image["width"]] for image in data["images"]}
    for ann in data["annotations"]:
        seg = ann["segmentation"]
        if isinstance(seg, dict):
            if "counts" not in seg or "size" not in seg:
                problem = "is RLE without 'counts' and 'size'"
            elif list(seg["size"]) != sizes[ann["image_id"]]:
                problem = f"is RLE of size {seg['size']} but its image is {sizes[ann['image_id']]} (height, width)"
            else:
                continue
        elif isinstance(seg, list) and seg and all(
                isinstance(poly, list) and len(poly) >= 4 and len(poly) % 2 == 0
                and all(isinstance(v, int | float) for v in poly) for poly in seg):
            continue
        else:
            problem = "is neither RLE nor a list of polygons [[x1, y1, x2, y2, ...], ...]"
        raise EffdlError(f"{ann_file}: the segmentation of annotation id={ann['id']} {problem}")


def _check_image_files(images: list[dict[str, Any]], image_dir: Path, ann_file: Path) -> None:
    if not image_dir.is_dir():
        raise EffdlError(f"image folder {image_dir} does not exist")
    # One directory listing instead of a stat per image: real COCO has 118k images in one folder.
    present = {p.name for p in image_dir.iterdir()}
    if not present:
        raise EffdlError(f"image folder {image_dir} is empty")
    missing = [image for image in images
               if not (image["file_name"] in present or (image_dir / image["file_name"]).is_file())]
    if missing:
        first = missing[0]
        more = f"; {len(missing) - 1} more images in {ann_file} are missing too" if len(missing) > 1 else ""
        raise EffdlError(f"image file {image_dir / first['file_name']} (image id={first['id']}) does not exist{more}")
