"""SOFT vs a timm softmax baseline: Fashion-MNIST accuracy at the same budget (images/s: soft_throughput.py).

    python benchmarks/soft_fashion.py [--epochs 10 --img-size 64 --baseline pvt_v2_b1]

Trains each model with the same recipe and budget (effdl.soft.train) and evaluates top-1 on the 10,000
test images after every epoch.
"""

from __future__ import annotations

import argparse

from harness import RESULTS, report, train_resumably

from effdl.report import line_plot
from effdl.soft.train import TRAINER, ImageTrainConfig, create_classifier, train_classifier


def accuracy(args: argparse.Namespace) -> None:
    rows, curves = [], {}
    for name in ("soft_tiny", args.baseline):
        cfg = ImageTrainConfig(model=name, img_size=args.img_size, epochs=args.epochs, batch_size=args.batch_size,
                               lr=args.lr, warmup_epochs=min(1.0, args.epochs / 4), out_dir=f"runs/bench-{name}")
        result, _ = train_resumably(train_classifier, cfg, TRAINER)
        params = sum(p.numel() for p in create_classifier(name, args.img_size).parameters())
        rows.append((name, f"{params / 1e6:.1f}M", args.epochs, f"{result.metrics['top1']:.2f}%",
                     f"{result.items_per_s:.0f}"))
        curves[name] = ([e["epoch"] for e in result.evals], [e["metrics"]["top1"] for e in result.evals])
    title = f"Fashion-MNIST {args.img_size}px, {args.epochs} epochs, same recipe"
    report("soft_fashion_accuracy", title, ["model", "params", "epochs", "test top-1", "train img/s"], rows,
           extra={"args": vars(args), "curves": curves})
    line_plot(RESULTS / "soft_fashion_accuracy.png", curves, title=title, xlabel="epoch", ylabel="test top-1 (%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--baseline", default="pvt_v2_b1", help="timm softmax model for the accuracy comparison")
    args = parser.parse_args()
    accuracy(args)


if __name__ == "__main__":
    main()
