"""Does long-sequence training pay off? Held-out loss by position: FPDT at a long length vs plain at a short one.

    python benchmarks/fpdt_context.py [--seq-len 8192 --short-len 512 --steps 60]
    python benchmarks/fpdt_context.py --plot-only     # redraw the PNG from results/fpdt_context.json

Both models see the same number of training tokens (steps x seq_len). The
FPDT model trains on whole ``--seq-len`` windows; the plain model on
``--short-len`` windows (batch = seq_len / short_len), the length plain
training fits in memory. Both are then evaluated on held-out windows of
``--seq-len`` tokens: a model that uses long context keeps lowering its loss
with position, one trained short cannot use what lies beyond its window.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from harness import RESULTS, add_plot_only, load_results, report

from effdl.core.hf import load_checkpoint
from effdl.fpdt.pipeline import FPDTConfig
from effdl.fpdt.train import bucket_means, loss_by_position, train_fpdt
from effdl.report import line_plot
from effdl.train.lm import TrainConfig, train


def plot(path: Path = RESULTS / "fpdt_context.json") -> None:
    """Draw fpdt_context.png, the mean loss per position bucket at the bucket's middle, from the results JSON."""
    results = load_results(path)
    buckets = [[int(x.replace(",", "")) for x in row[0].split("-")] for row in results["rows"]]  # "1,024-2,047"
    mids = [(a + b) / 2 for a, b in buckets]
    curves = {name: (mids, [row[i] for row in results["rows"]]) for i, name in enumerate(results["columns"][1:], 1)}
    window = buckets[-1][1] + 1
    line_plot(RESULTS / "fpdt_context.png", curves, title=f"Held-out loss by token position ({window:,}-token windows)",
              xlabel="token position (bucket midpoints, log scale)", ylabel="next-token loss (nats/byte)", logx=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--short-len", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--windows", type=int, default=4)
    add_plot_only(parser)
    args = parser.parse_args()
    if args.plot_only:
        plot()
        return
    common = dict(preset="tiny", steps=args.steps, warmup_steps=max(1, args.steps // 10), eval_every=0,
                  eval_batches=1, lr=3e-3)
    long = train_fpdt(TrainConfig(seq_len=args.seq_len, batch_size=1, out_dir="runs/fpdt-context-long", **common),
                      FPDTConfig(chunk_size=args.chunk, offload="disk"))
    short = train(TrainConfig(seq_len=args.short_len, batch_size=args.seq_len // args.short_len,
                              out_dir="runs/fpdt-context-short", **common))
    curves = {f"FPDT, trained at {args.seq_len:,}": loss_by_position(load_checkpoint(long.checkpoint),
                                                                      args.seq_len, args.windows),
              f"plain, trained at {args.short_len:,}": loss_by_position(load_checkpoint(short.checkpoint),
                                                                         args.seq_len, args.windows)}
    edges = [0, 64, 256, args.short_len, 2 * args.short_len, args.seq_len // 4, args.seq_len // 2, args.seq_len]
    edges = sorted(set(edges))
    means = {name: bucket_means(curve, edges) for name, curve in curves.items()}
    rows = [[f"{a:,}-{b - 1:,}", *(m[i] for m in means.values())] for i, (a, b) in enumerate(itertools.pairwise(edges))]
    plot(report("fpdt_context", f"Held-out loss by position, {args.windows} windows of {args.seq_len:,} tokens "
                f"(same training tokens: {args.steps} x {args.seq_len:,})", ["positions", *curves], rows,
                extra={"curves": {k: v.tolist() for k, v in curves.items()}}))


if __name__ == "__main__":
    main()
