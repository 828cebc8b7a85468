"""``effdl soft {train,eval}``: train a timm classifier (soft_tiny ... or any baseline) and score a checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from effdl.train.options import add_epoch_options, config_defaults, given_options


def _train(args: argparse.Namespace) -> None:
    from effdl.report import print_table
    from effdl.soft.train import ImageTrainConfig, load_checkpoint_config, train_classifier

    given = given_options(args, ImageTrainConfig)
    cfg = load_checkpoint_config(args.resume, **given) if args.resume else ImageTrainConfig(**given)
    runs = [(cfg, args.resume)]
    if args.baseline:  # side by side: each model's run in its own folder under --out
        runs = [(dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir) / cfg.model)), args.resume),
                (dataclasses.replace(cfg, model=args.baseline, out_dir=str(Path(cfg.out_dir) / args.baseline)), None)]
    rows = []
    for run_cfg, resume in runs:
        result = train_classifier(run_cfg, resume=resume)
        rows.append((run_cfg.model, result.step, f"{result.metrics['top1']:.2f}%", f"{result.items_per_s:,.0f}",
                     str(result.checkpoint)))
    print_table(f"{cfg.data} at {cfg.img_size}px", ["model", "steps", "test top-1", "train img/s", "checkpoint"],
                rows)


def _eval(args: argparse.Namespace) -> None:
    from effdl.core.device import resolve_device
    from effdl.soft.train import evaluate_classifier, load_classifier, load_split

    device = resolve_device(args.device)
    model, cfg = load_classifier(args.checkpoint, device)
    if args.eval_subset is not None:
        cfg.eval_subset = args.eval_subset
    metrics = evaluate_classifier(model, load_split(cfg, train=False, device=device), device)
    print(f"{cfg.model} on {cfg.data} test ({cfg.img_size}px): top-1 {metrics['top1']:.2f}%, "
          f"loss {metrics['loss']:.4f}")


def add_commands(verbs: argparse._SubParsersAction) -> None:
    from effdl.core.data import IMAGE_SETS
    from effdl.soft.train import ImageTrainConfig

    d = config_defaults(ImageTrainConfig)
    train = verbs.add_parser("train", help="train a timm model (soft_tiny or a baseline) on Fashion-MNIST or shapes10")
    train.add_argument("--model", help=f"timm model name (default {d['model']})")
    train.add_argument("--data", help=f"dataset: {', '.join(IMAGE_SETS)} (default {d['data']})")
    train.add_argument("--img-size", dest="img_size", type=int, help=f"input size in pixels (default {d['img_size']})")
    add_epoch_options(train, ImageTrainConfig)
    train.add_argument("--weight-decay", dest="weight_decay", type=float,
                       help=f"AdamW weight decay (default {d['weight_decay']:g})")
    train.add_argument("--warmup-epochs", dest="warmup_epochs", type=float,
                       help=f"linear warmup (default {d['warmup_epochs']:g})")
    train.add_argument("--label-smoothing", dest="label_smoothing", type=float,
                       help=f"(default {d['label_smoothing']:g})")
    train.add_argument("--train-subset", dest="train_subset", type=int,
                       help=f"first N training images (0 = all; default {d['train_subset']})")
    train.add_argument("--eval-subset", dest="eval_subset", type=int,
                       help=f"first N test images (0 = all; default {d['eval_subset']})")
    train.add_argument("--baseline",
                       help="also train this timm model with the same recipe, side by side (each in --out/<model>)")
    train.set_defaults(func=_train)

    ev = verbs.add_parser("eval", help="top-1 of a checkpoint written by `effdl soft train`")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--eval-subset", dest="eval_subset", type=int,
                    help="first N test images (default: the checkpoint's)")
    ev.add_argument("--device", default="auto", help="(default %(default)s)")
    ev.set_defaults(func=_eval)
