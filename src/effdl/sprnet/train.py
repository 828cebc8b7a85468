"""Training, evaluation and prediction for SPRNet and its two baselines (torchvision Mask R-CNN and RetinaNet).

``train_detector(cfg)`` trains any model of ``effdl.sprnet.model.DETECTORS``
on synthetic shapes or a COCO-format folder with one recipe (AdamW, warmup +
cosine, gradient clipping, horizontal flips), evaluates COCO box and mask AP
after every ``eval_every`` epochs, and writes a checkpoint there that
``--resume`` continues exactly; the loop is ``effdl.train``'s. A checkpoint
holds the config and category names, so ``load_detector(path)`` rebuilds the
model with nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from effdl.core.data import cache_dir
from effdl.core.device import autocast_for, resolve_device
from effdl.errors import EffdlError
from effdl.sprnet.data import CocoInstances, collate, load_image, write_shapes_dataset
from effdl.sprnet.evaluate import draw_overlay, evaluate_model, save_overlay
from effdl.sprnet.model import (
    ALL_BACKBONES,
    ANCHOR_FREE,
    DETECTORS,
    build_detector,
    detector_defaults,
    detector_family,
    detector_options,
)
from effdl.train.batches import EpochOrder
from effdl.train.checkpoint import latest_checkpoint, read_trainer_state, read_weights, saved_config
from effdl.train.loop import LoopConfig, TrainResult, TrainTask, fit

TRAINER = "effdl sprnet train"
# AdamW's peak learning rate per model family when the config gives none: the best the plateau benchmark measured
# (benchmarks/sprnet_vs_maskrcnn.py, README; 1, 2 and 3e-4 tried at 10 epochs for SPR-FCOS and Mask R-CNN).
# RetinaNet's GroupNorm heads stop separating classes at lr >= 5e-4 (they learn objectness only), so the RetinaNet
# family stays at 1e-4.
FAMILY_LR = {"sprnet": 1e-4, "sprnet_fcos": 3e-4, "retinanet": 1e-4, "maskrcnn": 3e-4}


# Model options the config sets from its own fields (create_detector)
_CONFIG_FIELDS = {"weights_backbone", "min_size", "max_size", "smallest_anchor", "box_batch_size_per_image"}


def _pinned_defaults(model: str) -> dict[str, Any]:
    return {k: v for k, v in detector_defaults(model).items() if k not in _CONFIG_FIELDS}


@dataclass
class DetectionTrainConfig:
    # a DETECTORS name, or "maskrcnn" / "retinanet" on `backbone`; the default is SPR on FCOS, the variant that meets
    # the plateau benchmark's targets (the paper's SPR on RetinaNet: sprnet_resnet18_fpn)
    model: str = "sprnet_fcos_resnet18_fpn"
    backbone: str = "resnet18"  # only read for the bare baseline names
    data: str = "shapes"  # "shapes" (generated once into the cache) or a COCO folder
    train_split: str = "train"
    val_split: str = "val"
    shapes_train_images: int = 1000
    shapes_val_images: int = 200
    shapes_image_size: int = 128
    # The model's transform resizes the shorter side to min_size (longer side at
    # most max_size). Defaults suit 128-px shapes; COCO: 800 / 1333 / 32.
    min_size: int = 128
    max_size: int = 128
    smallest_anchor: int = 16  # pixels of the resized image; torchvision's 32 misses shapes below ~20 px
    epochs: float = 12.0
    batch_size: int = 4
    lr: float | None = None  # None: the model family's (FAMILY_LR)
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 10.0  # the paper clips gradients; 10 only stops rare spikes
    hflip_prob: float = 0.5
    weights_backbone: str | None = None  # a local torchvision ResNet state dict, or a SOFT checkpoint
    # Mask R-CNN only: RoIs sampled per image for its box/mask heads (torchvision: 512). On small images with few
    # objects 128 loses nothing and makes its CPU training ~3x cheaper (RoIAlign's backward dominates).
    maskrcnn_rois_per_image: int = 512
    # SPR families only: the mask head's learning rate as a multiple of ``lr`` (it starts from scratch, and at 1x
    # its loss is barely under a mean-mask predictor's after 4 epochs of the plateau benchmark).
    mask_head_lr_scale: float = 1.0
    # Keyword arguments for the model's builder (e.g. SPRNet's ``mask_size``); must be ones it accepts. Every option
    # effdl chooses a default for is added with that default (``detector_defaults``), so a checkpoint records them.
    model_options: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    eval_images: int = 0  # 0 = the whole validation split
    out_dir: str = "runs/sprnet"
    seed: int = 0
    device: str = "auto"
    max_time_s: float | None = None  # stop (and evaluate) after this many seconds of training

    def __post_init__(self) -> None:
        if self.model in ("maskrcnn", "retinanet"):
            if self.backbone not in ALL_BACKBONES:
                raise EffdlError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(ALL_BACKBONES)}")
            self.model = f"{self.model}_{self.backbone}_fpn"
        if self.model not in DETECTORS:
            raise EffdlError(f"unknown model {self.model!r}; choose maskrcnn, retinanet or one of "
                             f"{', '.join(DETECTORS)}")
        for option in self.model_options:
            if option in _CONFIG_FIELDS:
                raise EffdlError(f"model option {option!r} is set by the config itself; use its own field")
            if option not in detector_options(self.model):
                raise EffdlError(f"unknown model option {option!r} for {self.model}; it takes "
                                 f"{', '.join(o for o in detector_options(self.model) if o not in _CONFIG_FIELDS)}")
        # pinned, as lr is below: a checkpoint resumes and loads as trained after a later effdl changes a default
        self.model_options = {**_pinned_defaults(self.model), **self.model_options}
        if self.lr is None:
            self.lr = FAMILY_LR[detector_family(self.model)]
        if self.mask_head_lr_scale != 1.0 and not self.model.startswith("sprnet"):
            raise EffdlError(f"mask_head_lr_scale is for the SPR families (sprnet, sprnet_fcos), not {self.model}")
        for name in ("epochs", "batch_size", "lr", "min_size", "max_size", "smallest_anchor", "mask_head_lr_scale"):
            if getattr(self, name) <= 0:
                raise EffdlError(f"{name} must be positive, got {getattr(self, name)}")


def load_dataset(cfg: DetectionTrainConfig, split: str, train: bool = False) -> CocoInstances:
    """One split of ``cfg.data``; synthetic shapes are generated on first use into the effdl cache."""
    root = Path(cfg.data)
    if cfg.data == "shapes":
        root = cache_dir() / (f"sprnet-shapes-{cfg.shapes_image_size}px-{cfg.shapes_train_images}-"
                              f"{cfg.shapes_val_images}-seed{cfg.seed}")
        if not (root / "annotations" / f"instances_{split}.json").is_file():
            n = cfg.shapes_train_images if split == cfg.train_split else cfg.shapes_val_images
            write_shapes_dataset(root, split, n, cfg.shapes_image_size, seed=cfg.seed)
    elif not root.is_dir():
        raise EffdlError(f"--data {cfg.data!r} is neither 'shapes' nor a folder")
    return CocoInstances(root, split, train=train, hflip_prob=cfg.hflip_prob)


def _check_categories(dataset: CocoInstances, names: list[str], what: str) -> None:
    if dataset.category_names != names:
        raise EffdlError(f"{dataset.ann_file} has categories {dataset.category_names}, {what} {names}")


def create_detector(cfg: DetectionTrainConfig, num_classes: int) -> nn.Module:
    extra = {"box_batch_size_per_image": cfg.maskrcnn_rois_per_image} if cfg.model.startswith("maskrcnn") else {}
    if detector_family(cfg.model) not in ANCHOR_FREE:
        extra["smallest_anchor"] = cfg.smallest_anchor
    return build_detector(cfg.model, num_classes, weights_backbone=cfg.weights_backbone, min_size=cfg.min_size,
                          max_size=cfg.max_size, **extra, **cfg.model_options)


def train_detector(cfg: DetectionTrainConfig, resume: str | Path | None = None,
                   progress: bool = True) -> TrainResult:
    """Train ``cfg.model``; evaluate COCO AP on the validation split every ``eval_every`` epochs and at the end.

    The result's evaluations hold ``{"bbox": {...}, "segm": {...}}`` (``segm`` for mask models); with ``resume``
    (a checkpoint or run folder) the run continues exactly.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train_data, val_data = load_dataset(cfg, cfg.train_split, train=True), load_dataset(cfg, cfg.val_split)
    _check_categories(val_data, train_data.category_names, "the training split has")
    model = create_detector(cfg, train_data.num_classes).to(device)
    if resume is not None:
        load_weights(model, latest_checkpoint(resume), cfg, device)
    mask_head = {id(p) for p in model.mask_head.parameters()} if hasattr(model, "mask_head") else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = [{"params": [p for p in trainable if id(p) not in mask_head]},
              {"params": [p for p in trainable if id(p) in mask_head], "lr_scale": cfg.mask_head_lr_scale}]
    order = EpochOrder(len(train_data), cfg.batch_size, cfg.seed)
    steps_per_epoch = order.steps_per_epoch

    def batch(step: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # flips: a function of (seed, step), like the batches
        images, targets = collate([train_data[int(i)] for i in order(step)])
        return [im.to(device) for im in images], [{k: v.to(device) for k, v in t.items()} for t in targets]

    task = TrainTask(
        name=cfg.model, model=model,
        # fused: one kernel over all parameters, 7x faster than the default on CPU for these ~20M parameters
        optimizer=torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True),
        batch=batch, loss=lambda batch: sum(model(*batch).values()),
        evaluate=lambda: evaluate(model, val_data, cfg, device),
        trainer=TRAINER, config=dataclasses.asdict(cfg), extra={"category_names": train_data.category_names},
        headline=_headline, headline_label="mask AP" if "retinanet" not in cfg.model else "box AP")
    loop = LoopConfig(steps=max(1, round(cfg.epochs * steps_per_epoch)), lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                      min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip,
                      eval_every=cfg.eval_every * steps_per_epoch, checkpoint_every=cfg.eval_every * steps_per_epoch,
                      max_time_s=cfg.max_time_s, out_dir=cfg.out_dir, steps_per_epoch=steps_per_epoch,
                      items_per_step=cfg.batch_size)
    return fit(task, loop, resume=resume, progress=progress)


def evaluate(model: nn.Module, dataset: CocoInstances, cfg: DetectionTrainConfig,
             device: torch.device) -> dict[str, dict[str, float]]:
    with autocast_for(device):
        return evaluate_model(model, dataset.head(cfg.eval_images), batch_size=cfg.batch_size, device=device,
                              progress=False)


def _headline(metrics: dict[str, dict[str, float]]) -> float | None:
    """The AP a progress bar shows: mask AP for mask models, box AP otherwise."""
    chosen = metrics.get("segm") or metrics.get("bbox")
    return None if chosen is None else 100 * chosen["AP"]


def saved_detection_config(path: str | Path) -> dict[str, Any]:
    """The config (as a dict) a checkpoint of ``train_detector`` was trained with, for resuming with overrides."""
    return saved_config(path, TRAINER)


def load_weights(model: nn.Module, folder: Path, cfg: DetectionTrainConfig, device: str | torch.device = "cpu") -> None:
    """Load checkpoint ``folder``'s weights into ``model`` (built from ``cfg``), or say which options would fit."""
    try:
        model.load_state_dict(read_weights(folder, device))
    except RuntimeError as e:  # missing, unexpected or reshaped weights
        detail = (str(e).split("\n\t")[1:2] or [str(e)])[0][:200]
        defaults = _pinned_defaults(cfg.model)
        chosen = {k: v for k, v in cfg.model_options.items() if k not in defaults or defaults[k] != v}
        raise EffdlError(f"{folder} does not fit {cfg.model} with model options {chosen} over this version's "
                         f"defaults ({detail}). A checkpoint trained under other defaults loads with the options it "
                         f"was trained with: load_detector(path, model_options={{...}})") from None


def load_detector(path: str | Path, device: str = "auto", **overrides: Any) -> tuple[nn.Module,
                                                                                     DetectionTrainConfig, list[str]]:
    """(model in eval mode, its training config with ``overrides``, category names) from a checkpoint or run folder."""
    state = read_trainer_state(path, TRAINER)
    cfg = DetectionTrainConfig(**{**state["config"], **overrides})
    model = create_detector(cfg, len(state["category_names"]) + 1)
    load_weights(model, state["folder"], cfg)
    return model.to(resolve_device(device)).eval(), cfg, state["category_names"]


def evaluate_checkpoint(path: str | Path, data: str | None = None, split: str | None = None,
                        device: str = "auto") -> dict[str, dict[str, float]]:
    """COCO AP of a checkpoint on ``split`` of ``data`` (default: the data and validation split it was trained with)."""
    overrides = {k: v for k, v in (("data", data), ("val_split", split)) if v is not None}
    model, cfg, names = load_detector(path, device, **overrides)
    val = load_dataset(cfg, cfg.val_split)
    _check_categories(val, names, "the checkpoint was trained on")
    return evaluate(model, val, dataclasses.replace(cfg, eval_images=0), next(model.parameters()).device)


@torch.inference_mode()
def predict_image(path: str | Path, image: str | Path, out: str | Path, score_threshold: float = 0.5,
                  device: str = "auto") -> dict[str, torch.Tensor]:
    """Detect instances in one image file and write an overlay PNG of masks, boxes and labels to ``out``."""
    model, _, names = load_detector(path, device)
    pixels = load_image(image)
    prediction = {k: v.cpu() for k, v in model([pixels.to(next(model.parameters()).device)])[0].items()}
    save_overlay(out, draw_overlay(pixels, prediction, names, score_threshold=score_threshold))
    return prediction
