"""``effdl sprnet {train,eval,predict,pretrain}``: SPRNet and its baselines (Mask R-CNN, RetinaNet) on COCO-format
data or synthetic shapes."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

from effdl.train.options import add_epoch_options, config_defaults, given_options


def _train(args: argparse.Namespace) -> None:
    from effdl.report import print_table
    from effdl.sprnet.evaluate import METRIC_NAMES, format_metrics
    from effdl.sprnet.train import DetectionTrainConfig, saved_detection_config, train_detector

    saved = saved_detection_config(args.resume) if args.resume else {}
    given = given_options(args, DetectionTrainConfig)
    if args.model_options:
        given["model_options"] = {**saved.get("model_options", {}), **dict(args.model_options)}
    result = train_detector(DetectionTrainConfig(**{**saved, **given}), resume=args.resume)
    print_table(f"{result.evals[-1]['epoch']:g} epochs, checkpoint {result.checkpoint}", ["IoU", *METRIC_NAMES],
                format_metrics(result.metrics))


def _model_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a JSON value (``64``, ``true``, ``0.3``), else the string itself."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _eval(args: argparse.Namespace) -> None:
    from effdl.report import print_table
    from effdl.sprnet.evaluate import METRIC_NAMES, format_metrics
    from effdl.sprnet.train import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, device=args.device)
    print_table(f"COCO AP of {args.checkpoint}", ["IoU", *METRIC_NAMES], format_metrics(metrics))


def _predict(args: argparse.Namespace) -> None:
    from effdl.sprnet.train import predict_image

    prediction = predict_image(args.checkpoint, args.image, args.out, args.score_threshold, device=args.device)
    kept = int((prediction["scores"] > args.score_threshold).sum())
    print(f"{kept} instances above score {args.score_threshold}; overlay written to {args.out}")


def _pretrain(args: argparse.Namespace) -> None:
    from effdl.sprnet.pretrain import pretrain_backbone, save_backbone
    from effdl.sprnet.train import DetectionTrainConfig, load_dataset

    cfg = DetectionTrainConfig(data=args.data, shapes_train_images=args.shapes_train_images)
    state, accuracy = pretrain_backbone(load_dataset(cfg, args.split or cfg.train_split), args.backbone, args.steps)
    out = save_backbone(state, args.out or Path(f"runs/backbone-{args.backbone}.pth"))
    print(f"{args.backbone} crop accuracy {100 * accuracy:.1f}%; weights written to {out} "
          f"(use --weights-backbone {out})")


def add_commands(verbs: argparse._SubParsersAction) -> None:
    from effdl.sprnet.model import ALL_BACKBONES, BACKBONES, DETECTORS
    from effdl.sprnet.pretrain import pretrain_backbone
    from effdl.sprnet.train import FAMILY_LR, DetectionTrainConfig, predict_image

    d = config_defaults(DetectionTrainConfig)
    backbones = ", ".join(ALL_BACKBONES)
    train = verbs.add_parser("train", help="train SPRNet, Mask R-CNN or RetinaNet; COCO box/mask AP every epoch")
    train.add_argument("--model", help=f"{', '.join(DETECTORS)}, or maskrcnn / retinanet on --backbone "
                                       f"(default {d['model']})")
    train.add_argument("--backbone", help=f"{backbones}, for maskrcnn / retinanet (default {d['backbone']})")
    train.add_argument("--data", help=f"'shapes' (synthetic, generated once) or a COCO folder (default {d['data']})")
    train.add_argument("--train-split", dest="train_split", help=f"(default {d['train_split']}; COCO: train2017)")
    train.add_argument("--val-split", dest="val_split", help=f"(default {d['val_split']}; COCO: val2017)")
    train.add_argument("--shapes-images", dest="shapes_train_images", type=int,
                       help=f"synthetic training images (default {d['shapes_train_images']})")
    add_epoch_options(train, DetectionTrainConfig, lr_default="per model family: " + ", ".join(
        f"{family} {lr:g}" for family, lr in FAMILY_LR.items()))
    train.add_argument("--min-size", dest="min_size", type=int,
                       help=f"resize shorter side to (default {d['min_size']})")
    train.add_argument("--max-size", dest="max_size", type=int, help=f"longer side at most (default {d['max_size']})")
    train.add_argument("--smallest-anchor", dest="smallest_anchor", type=int,
                       help=f"P3 anchor px (default {d['smallest_anchor']})")
    train.add_argument("--weights-backbone", dest="weights_backbone",
                       help="local torchvision ResNet state dict, or a SOFT checkpoint for soft_* backbones")
    train.add_argument("--mask-head-lr-scale", dest="mask_head_lr_scale", type=float,
                       help="SPR families: the mask head's learning rate as a multiple of --lr "
                            f"(default {d['mask_head_lr_scale']:g})")
    train.add_argument("--model-option", dest="model_options", action="append", type=_model_option,
                       metavar="KEY=VALUE", help="a model keyword, e.g. mask_size=64, class_agnostic_masks=true, "
                                                 "score_thresh=0.1 (JSON values; repeat for more)")
    train.add_argument("--eval-every", dest="eval_every", type=int,
                       help=f"epochs between validation passes (default {d['eval_every']})")
    train.add_argument("--eval-images", dest="eval_images", type=int,
                       help=f"first N validation images (0 = all; default {d['eval_images']})")
    train.set_defaults(func=_train)

    ev = verbs.add_parser("eval", help="COCO box and mask AP of a checkpoint")
    ev.add_argument("--checkpoint", required=True, help="checkpoint (.pth) or run folder (its newest)")
    ev.add_argument("--data", help="COCO folder (default: the data it was trained on)")
    ev.add_argument("--split", help="split to score (default: its validation split)")
    ev.add_argument("--device", default="auto", help="(default %(default)s)")
    ev.set_defaults(func=_eval)

    predict = verbs.add_parser("predict", help="draw the detected masks and boxes on one image")
    predict.add_argument("image")
    predict.add_argument("--checkpoint", required=True, help="checkpoint (.pth) or run folder (its newest)")
    predict.add_argument("--out", default="overlay.png", help="(default %(default)s)")
    predict.add_argument("--score-threshold", dest="score_threshold", type=float,
                         default=inspect.signature(predict_image).parameters["score_threshold"].default,
                         help="(default %(default)s)")
    predict.add_argument("--device", default="auto", help="(default %(default)s)")
    predict.set_defaults(func=_predict)

    pre = inspect.signature(pretrain_backbone).parameters
    pretrain = verbs.add_parser("pretrain", help="pretrain a backbone on the data's object crops (no ImageNet here)")
    pretrain.add_argument("--data", default=d["data"], help="'shapes' or a COCO folder (default %(default)s)")
    pretrain.add_argument("--split", help=f"(default {d['train_split']})")
    pretrain.add_argument("--shapes-images", dest="shapes_train_images", type=int, default=d["shapes_train_images"],
                          help="synthetic training images (default %(default)s)")
    pretrain.add_argument("--backbone", default=pre["backbone"].default,
                          help=f"{' or '.join(BACKBONES)} (default %(default)s)")
    pretrain.add_argument("--steps", type=int, default=pre["steps"].default,
                          help=f"batches of {pre['batch_size'].default} crops (default %(default)s)")
    pretrain.add_argument("--out", type=Path, help="(default runs/backbone-BACKBONE.pth)")
    pretrain.set_defaults(func=_pretrain)
