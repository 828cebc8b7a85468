"""SPRNet on a SOFT-Tiny-FPN vs a ResNet-18-FPN: same data, steps, batch and schedule; COCO AP and latency.

    python benchmarks/sprnet_soft_backbone.py [--steps 800] [--image-size 96] [--batch-size 4]
                                              [--latency-sizes 512 1024] [--repeat 10]
    python benchmarks/sprnet_soft_backbone.py --plot-only   # redraw the PNG from results/sprnet_soft_backbone.json

Both SPRNets (gated FPN, P3-P7, the same anchors, heads and detection cap)
train with one recipe (``effdl.sprnet.train``: AdamW, warmup + cosine, the same
``--steps`` of ``--batch-size`` images; a rerun resumes any run of the identical
config left in ``runs/bench-sprnet-soft``), then COCO box and mask AP is scored
on the validation split and inference is timed with the trained weights: batch 1,
eval mode, score threshold 0.05 and at most 100 detections for both, validation
images resized to each ``--latency-sizes`` by the models' transform, the two
models interleaved, median of ``--repeat`` images (``sprnet_vs_maskrcnn.latency``).

Both backbones start from scratch: ``sprnet_vs_maskrcnn`` pretrains its ResNet
on object crops, but ``effdl.sprnet.pretrain`` builds torchvision ResNets only,
so that stand-in for ImageNet weights does not exist for SOFT, and giving it to
one side only would measure the pretraining. From scratch on a CPU budget the
RetinaNet family localises better than it classifies (see ``pretrain.py``), so
read the APs as a comparison at equal budget, not as either backbone's ceiling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from harness import RESULTS, add_plot_only, load_results, report, train_resumably
from sprnet_vs_maskrcnn import latency

from effdl.report import line_plot
from effdl.sprnet.train import TRAINER, DetectionTrainConfig, train_detector
from effdl.train.batches import epoch_steps

BACKBONES = ("soft_tiny", "resnet18")
NAMES = {"soft_tiny": "SOFT-Tiny", "resnet18": "ResNet-18"}


def train_both(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, list[dict]]]:
    """Train (or resume) SPRNet on each backbone with the same config apart from the model."""
    epochs = args.steps / epoch_steps(args.train_images, args.batch_size)  # exactly --steps optimizer steps
    checkpoints, histories = {}, {}
    for backbone in BACKBONES:
        cfg = DetectionTrainConfig(model=f"sprnet_{backbone}_fpn", data=args.data,
                                   shapes_train_images=args.train_images, shapes_val_images=args.val_images,
                                   shapes_image_size=args.image_size, min_size=args.image_size,
                                   max_size=args.image_size, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                                   warmup_steps=args.warmup_steps, eval_every=max(1, int(epochs) + 1),  # at the end
                                   out_dir=f"runs/bench-sprnet-soft/{args.name}/{backbone}")
        result, checkpoints[cfg.model] = train_resumably(train_detector, cfg, TRAINER)
        print(f"{cfg.model}: {result.items_per_s:.1f} images/s in training")
        histories[cfg.model] = result.evals
    return checkpoints, histories


def plot(name: str = "sprnet_soft_backbone") -> None:
    """Draw <name>.png, latency against image size per backbone, the legend giving box and mask AP."""
    results = load_results(RESULTS / f"{name}.json")
    sizes = results["args"]["latency_sizes"]
    series = {}
    for model, metrics in results["metrics"].items():
        backbone = model.removeprefix("sprnet_").removesuffix("_fpn")
        label = (f"SPRNet {NAMES.get(backbone, backbone)}-FPN (box AP {100 * metrics['bbox']['AP']:.1f}, "
                 f"mask AP {100 * metrics['segm']['AP']:.1f})")
        series[label] = (sizes, [1e3 * results["latency_s"][str(s)][model] for s in sizes])
    args = results["args"]
    title = f"SPRNet from scratch, {args['steps']} steps x {args['batch_size']} at {args['image_size']} px: latency"
    line_plot(RESULTS / f"{name}.png", series, title=title,
              xlabel="image size (px, shorter side)",
              ylabel=f"median latency per image (ms, {results['args']['device']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--train-images", type=int, default=1000, help="synthetic shapes only")
    parser.add_argument("--val-images", type=int, default=100, help="synthetic shapes only")
    parser.add_argument("--image-size", type=int, default=96, help="training / evaluation size")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps, the same for both")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=80)
    parser.add_argument("--latency-sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeat", type=int, default=10, help="timed images per model and size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default="sprnet_soft_backbone", help="results/<name>.json|png and the run folder")
    add_plot_only(parser)
    args = parser.parse_args()
    if args.plot_only:
        plot(args.name)
        return

    checkpoints, histories = train_both(args)
    metrics = {model: history[-1]["metrics"] for model, history in histories.items()}
    seconds = latency(checkpoints, args.latency_sizes, args.repeat, args.device)
    rows = [(model, f"{100 * metrics[model]['bbox']['AP']:.1f}", f"{100 * metrics[model]['bbox']['AP50']:.1f}",
             f"{100 * metrics[model]['segm']['AP']:.1f}", f"{100 * metrics[model]['segm']['AP50']:.1f}",
             *(f"{1e3 * seconds[s][model]:.0f}" for s in args.latency_sizes)) for model in checkpoints]
    title = (f"SPRNet, SOFT-Tiny vs ResNet-18 FPN from scratch, {args.data} ({args.image_size}px), "
             f"{args.steps} steps x {args.batch_size}; latency batch 1 on {args.device}")
    report(args.name, title,
           ["model", "box AP", "box AP50", "mask AP", "mask AP50", *(f"ms @{s}px" for s in args.latency_sizes)],
           rows, extra={"args": vars(args), "metrics": metrics, "latency_s": seconds, "history": histories})
    plot(args.name)


if __name__ == "__main__":
    main()
