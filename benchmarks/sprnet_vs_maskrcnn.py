"""SPRNet vs torchvision Mask R-CNN and RetinaNet: same backbone, data and schedule; COCO AP and latency.

    python benchmarks/sprnet_vs_maskrcnn.py [--data shapes|COCO_DIR] [--epochs 8] [--train-images 1000]
                                            [--backbone resnet18] [--latency-sizes 128 512] [--repeat 40]
    python benchmarks/sprnet_vs_maskrcnn.py --plot-only     # redraw the PNG from results/sprnet_vs_maskrcnn.json

All three start from the same backbone, pretrained by classifying the
training split's object crops (``--pretrain-steps``; the stand-in for the
ImageNet weights the paper uses, which cannot be downloaded here), and train
with one recipe (``effdl.sprnet.train``; a rerun
resumes any run of the identical config left in ``runs/bench-sprnet``), scores
COCO box and mask AP on the validation split, then times inference with the
trained weights: batch 1, eval mode, the same image size and score threshold
(0.05) for all, validation images in turn, the models interleaved, median of
``--repeat`` images. ``--latency-sizes`` resizes the same images (the models'
transform) to show how the gap grows with resolution.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import torch
from harness import RESULTS, add_plot_only, load_results, report, resumable_checkpoint, time_interleaved

from effdl.report import line_plot
from effdl.sprnet.pretrain import pretrain_backbone, save_backbone
from effdl.sprnet.train import TRAINER, DetectionTrainConfig, load_dataset, load_detector, train_detector

MODELS = ("sprnet", "maskrcnn", "retinanet")  # the baselines on the same --backbone


def pretrained_backbone(args: argparse.Namespace) -> str | None:
    """The backbone all three detectors start from (the ImageNet stand-in, see ``effdl.sprnet.pretrain``), cached."""
    if args.pretrain_steps == 0:
        return None
    path = Path("runs/bench-sprnet") / (f"backbone-{args.backbone}-{args.data.replace('/', '_')}-{args.image_size}px-"
                                        f"{args.train_images}-{args.pretrain_steps}steps.pth")
    if not path.is_file():
        cfg = DetectionTrainConfig(data=args.data, shapes_train_images=args.train_images,
                                   shapes_val_images=args.val_images, shapes_image_size=args.image_size)
        state, accuracy = pretrain_backbone(load_dataset(cfg, cfg.train_split), args.backbone, args.pretrain_steps)
        print(f"pretrained {args.backbone} on object crops: {100 * accuracy:.1f}% crop accuracy")
        save_backbone(state, path)
    return str(path)


def train_all(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, list[dict]]]:
    """Train (or resume) each model with the same config apart from the model; final checkpoints and histories."""
    checkpoints, histories = {}, {}
    weights_backbone = pretrained_backbone(args)
    for name in MODELS:
        cfg = DetectionTrainConfig(model=f"sprnet_{args.backbone}_fpn" if name == "sprnet" else name,
                                   backbone=args.backbone, data=args.data, shapes_train_images=args.train_images,
                                   shapes_val_images=args.val_images, shapes_image_size=args.image_size,
                                   min_size=args.image_size, max_size=args.image_size, epochs=args.epochs,
                                   batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
                                   maskrcnn_rois_per_image=args.maskrcnn_rois, weights_backbone=weights_backbone,
                                   out_dir=f"runs/bench-sprnet/{name}")
        resume = resumable_checkpoint(cfg.out_dir, TRAINER, dataclasses.asdict(cfg))
        result = train_detector(cfg, resume=resume)
        checkpoints[cfg.model], histories[cfg.model] = result.checkpoint or resume, result.evals
    return checkpoints, histories


def latency(checkpoints: dict[str, Path], sizes: list[int], repeat: int, device: str) -> dict[int, dict[str, float]]:
    """Median seconds per image at each size, per model (trained weights, batch 1, eval mode)."""
    loaded = {name: load_detector(path, device=device) for name, path in checkpoints.items()}
    models = {name: model for name, (model, _, _) in loaded.items()}
    cfg = next(iter(loaded.values()))[1]
    val = load_dataset(cfg, cfg.val_split)
    images = [val[i][0].to(device) for i in range(min(len(val), repeat))]
    medians = {}
    for size in sizes:
        calls = {}
        for name, model in models.items():
            model.transform.min_size, model.transform.max_size = (size,), size
            calls[name] = _forward_in_turn(model, images)
        timings = time_interleaved(calls, warmup=2, repeat=repeat)
        medians[size] = {name: t.median_s for name, t in timings.items()}
    return medians


def _forward_in_turn(model: torch.nn.Module, images: list[torch.Tensor]):
    cycle = itertools.cycle(images)

    def forward() -> None:
        with torch.inference_mode():
            model([next(cycle)])

    return forward


def plot(path: Path = RESULTS / "sprnet_vs_maskrcnn.json") -> None:
    """Draw sprnet_vs_maskrcnn.png, AP against latency at the first latency size, from the results JSON."""
    results = load_results(path)
    args, size = results["args"], results["args"]["latency_sizes"][0]
    names = {"sprnet": "SPRNet", "maskrcnn": "Mask R-CNN", "retinanet": "RetinaNet"}
    backbone = args["backbone"].replace("resnet", "R")
    points = {}
    for model, metrics in results["metrics"].items():  # mask AP; box AP for RetinaNet, which has no masks
        kind = "segm" if "segm" in metrics else "bbox"
        label = f"{names[model.split('_')[0]]} {backbone} ({'mask' if kind == 'segm' else 'box'} AP)"
        points[label] = ([1e3 * results["latency_s"][str(size)][model]], [100 * metrics[kind]["AP"]])
    line_plot(RESULTS / "sprnet_vs_maskrcnn.png", points,
              title=f"AP vs latency at {size} px, batch 1 (up and left is better)",
              xlabel=f"median latency per image (ms, {args['device']})", ylabel="COCO AP on validation (%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--train-images", type=int, default=1000, help="synthetic shapes only")
    parser.add_argument("--val-images", type=int, default=200, help="synthetic shapes only")
    parser.add_argument("--image-size", type=int, default=128, help="training / evaluation size")
    parser.add_argument("--epochs", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--pretrain-steps", type=int, default=300,
                        help="crop-classification steps that pretrain the shared backbone (0: from scratch)")
    parser.add_argument("--eval-every", type=int, default=2, help="epochs between validation passes")
    parser.add_argument("--maskrcnn-rois", type=int, default=512, help="Mask R-CNN RoIs sampled per image in training")
    parser.add_argument("--latency-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeat", type=int, default=40, help="timed images per model and size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_plot_only(parser)
    args = parser.parse_args()
    if args.plot_only:
        plot()
        return

    checkpoints, histories = train_all(args)
    metrics = {name: history[-1]["metrics"] for name, history in histories.items()}
    seconds = latency(checkpoints, args.latency_sizes, args.repeat, args.device)

    spr, mrcnn, retina = checkpoints
    rows = []
    for name in checkpoints:
        box, mask = metrics[name]["bbox"], metrics[name].get("segm")
        mask_ap = ("-", "-") if mask is None else (f"{100 * mask['AP']:.1f}", f"{100 * mask['AP50']:.1f}")
        rows.append((name, f"{100 * box['AP']:.1f}", f"{100 * box['AP50']:.1f}", *mask_ap,
                     *(f"{1e3 * seconds[s][name]:.0f}" for s in args.latency_sizes)))
    ratio_rows = [(f"{s}px", f"{seconds[s][spr] / seconds[s][mrcnn]:.2f}x",
                   f"{seconds[s][spr] / seconds[s][retina]:.2f}x") for s in args.latency_sizes]
    start = f"pretrained ({args.pretrain_steps} crop steps)" if args.pretrain_steps else "from scratch"
    title = (f"{args.data} ({args.image_size}px), {args.backbone}-FPN {start}, {args.epochs:g} epochs, same recipe; "
             f"latency batch 1 on {args.device}")
    report("sprnet_vs_maskrcnn", title,
           ["model", "box AP", "box AP50", "mask AP", "mask AP50", *(f"ms @{s}px" for s in args.latency_sizes)],
           rows, extra={"args": vars(args), "metrics": metrics, "latency_s": seconds,
                        "history": histories})
    report("sprnet_latency_ratios", "SPRNet latency relative to the baselines (targets: <= 0.6x Mask R-CNN, "
           "<= 1.25x RetinaNet)", ["size", "SPRNet / Mask R-CNN", "SPRNet / RetinaNet"], ratio_rows)
    plot()


if __name__ == "__main__":
    main()
