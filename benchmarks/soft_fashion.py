"""SOFT vs timm softmax baselines: Fashion-MNIST accuracy at the same budget, and images/s by input size.

    python benchmarks/soft_fashion.py --part accuracy [--epochs 10 --img-size 64 --baseline pvt_v2_b1]
    python benchmarks/soft_fashion.py --part throughput [--sizes 224 448 --batch 8]

Accuracy trains each model with the same recipe and budget (effdl.soft.train)
and evaluates top-1 on the 10,000 test images; throughput times inference
forward passes of soft_tiny and the baselines, interleaved, at each size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from harness import RESULTS, report, resumable_checkpoint, time_interleaved

from effdl.report import bar_plot, line_plot
from effdl.soft.train import TRAINER, ImageTrainConfig, create_classifier, train_classifier


def accuracy(args: argparse.Namespace) -> None:
    rows, curves = [], {}
    for name in ("soft_tiny", args.baseline):
        cfg = ImageTrainConfig(model=name, img_size=args.img_size, epochs=args.epochs, batch_size=args.batch_size,
                               lr=args.lr, warmup_epochs=min(1.0, args.epochs / 4), out_dir=f"runs/bench-{name}")
        result = train_classifier(cfg, resume=resumable_checkpoint(cfg.out_dir, TRAINER, dataclasses.asdict(cfg)))
        params = sum(p.numel() for p in create_classifier(name, args.img_size).parameters())
        rows.append((name, f"{params / 1e6:.1f}M", args.epochs, f"{result.metrics['top1']:.2f}%",
                     f"{result.items_per_s:.0f}"))
        curves[name] = ([e["epoch"] for e in result.evals], [e["metrics"]["top1"] for e in result.evals])
    title = f"Fashion-MNIST {args.img_size}px, {args.epochs} epochs, same recipe"
    report("soft_fashion_accuracy", title, ["model", "params", "epochs", "test top-1", "train img/s"], rows,
           extra={"args": vars(args), "curves": curves})
    line_plot(RESULTS / "soft_fashion_accuracy.png", curves, title=title, xlabel="epoch", ylabel="test top-1 (%)")


def throughput(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = ["soft_tiny", *args.throughput_baselines]
    rows, series = [], {name: [] for name in names}
    for size in args.sizes:
        models = {name: create_classifier(name, size, num_classes=1000, in_chans=3).to(device).eval()
                  for name in names}
        x = torch.randn(args.batch, 3, size, size, device=device)

        def forward(model, x=x):
            with torch.inference_mode():
                model(x)

        timings = time_interleaved({n: (lambda m=m: forward(m)) for n, m in models.items()}, warmup=1,
                                   repeat=args.repeat)
        per_s = {n: args.batch / t.median_s for n, t in timings.items()}
        for n in names:
            series[n].append(per_s[n])
        rows.append((f"{size}px", *(f"{per_s[n]:.1f}" for n in names),
                     *(f"{per_s['soft_tiny'] / per_s[n]:.2f}x" for n in names[1:])))
    title = f"inference images/s, batch {args.batch}, {device}"
    report("soft_fashion_throughput", title,
           ["size", *names, *(f"soft_tiny / {n}" for n in names[1:])], rows, extra={"args": vars(args)})
    bar_plot(RESULTS / "soft_fashion_throughput.png", [f"{s}px" for s in args.sizes], series, title=title,
             ylabel="images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["accuracy", "throughput", "both"], default="both")
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--baseline", default="pvt_v2_b1", help="timm softmax model for the accuracy comparison")
    parser.add_argument("--throughput-baselines", nargs="+", default=["pvt_v2_b1", "deit_tiny_patch16_224"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.part in ("accuracy", "both"):
        accuracy(args)
    if args.part in ("throughput", "both"):
        throughput(args)
    print(json.dumps({"done": args.part}))


if __name__ == "__main__":
    main()
