"""Attention cost vs sequence length: SOFT vs torch SDPA vs naive softmax vs softmax Nyström.

Each (method, n) runs in a fresh process so its peak memory (RSS above the
process's level with inputs allocated) is its own. 2 heads of 32 dims, batch 1,
49 bottleneck tokens / landmarks (7x7, as SOFT at 224 px).

    python benchmarks/soft_attention.py [--max-n 50176] [--repeat 3]
    python benchmarks/soft_attention.py --plot-only     # redraw both PNGs from results/soft_attention.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import RESULTS, add_plot_only, load_results, report, time_interleaved

from effdl.report import line_plot
from effdl.soft import nystrom_gaussian_attention

HEADS, DIM, LANDMARKS = 2, 32, 49
GRIDS = [14, 28, 56, 112, 224]  # n = 196 ... 50,176
NAIVE_LIMIT_BYTES = 6 * 2**30  # the naive n x n score matrices must fit comfortably in 24 GiB


def pooled_landmarks(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, H, n, D) on a side x side grid -> (B, H, 49, D) by 7x7 adaptive average pooling."""
    B, H, _n, D = x.shape
    grid = x.transpose(-1, -2).reshape(B * H, D, side, side)  # (B*H, D, side, side)
    return F.adaptive_avg_pool2d(grid, 7).flatten(2).transpose(-1, -2).reshape(B, H, LANDMARKS, D)


def naive_softmax(q, k, v):
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v  # (B, H, n, n) scores


def softmax_nystrom(q, k, v, side):
    """Nyströmformer-style: softmax kernels around pooled landmarks, pinv of the softmax core."""
    scale = q.shape[-1] ** -0.25
    q, k = q * scale, k * scale
    q_l, k_l = pooled_landmarks(q, side), pooled_landmarks(k, side)
    a1 = (q @ k_l.transpose(-1, -2)).softmax(-1)  # (B, H, n, m)
    a2 = (q_l @ k_l.transpose(-1, -2)).softmax(-1)  # (B, H, m, m)
    a3 = (q_l @ k.transpose(-1, -2)).softmax(-1)  # (B, H, m, n)
    return a1 @ (torch.linalg.pinv(a2) @ (a3 @ v))


def method_fn(method: str, side: int):
    n = side * side
    q = torch.randn(1, HEADS, n, DIM) / DIM**0.25
    k, v = torch.randn(1, HEADS, n, DIM), torch.randn(1, HEADS, n, DIM)
    if method == "soft":
        landmarks = pooled_landmarks(q, side)
        return lambda: nystrom_gaussian_attention(q, landmarks, v)
    if method == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if method == "naive softmax":
        return lambda: naive_softmax(q, k, v)
    if method == "softmax nystrom":
        return lambda: softmax_nystrom(q, k, v, side)
    raise ValueError(method)


def worker(method: str, side: int, repeat: int) -> None:
    with torch.inference_mode():
        fn = method_fn(method, side)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        timing = time_interleaved({method: fn}, warmup=1, repeat=repeat)[method]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"ms": timing.median_s * 1e3, "peak_mib": max(0, peak - base) / 1024}))


def plot(path: Path = RESULTS / "soft_attention.json") -> None:
    """Draw soft_attention.png (time) and soft_attention_memory.png (peak memory) from the results JSON."""
    results = load_results(path)["results"]
    series = {method: ([int(n) for n in points], list(points.values())) for method, points in results.items()}
    largest = max(n for ns, _ in series.values() for n in ns)
    skipped = [method for method, (ns, _) in series.items() if largest not in ns]
    where = f"({HEADS} heads x {DIM} dims, {LANDMARKS} landmarks, batch 1, CPU)" + "".join(
        f"\n{method}: not run at {largest:,} tokens (its n x n scores would not fit)" for method in skipped)
    line_plot(RESULTS / "soft_attention.png", {k: (ns, [r["ms"] for r in rs]) for k, (ns, rs) in series.items()},
              title=f"Attention time vs tokens {where}", xlabel="tokens n (log scale)",
              ylabel="median time per call (ms, log scale)", logx=True, logy=True)
    line_plot(RESULTS / "soft_attention_memory.png",
              {k: (ns, [max(r["peak_mib"], 0.1) for r in rs]) for k, (ns, rs) in series.items()},
              title=f"Attention memory vs tokens {where}", xlabel="tokens n (log scale)",
              ylabel="peak RSS above inputs (MiB, log scale)", logx=True, logy=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=50_176)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SIDE"), help=argparse.SUPPRESS)
    add_plot_only(parser)
    args = parser.parse_args()
    if args.plot_only:
        plot()
        return
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.repeat)
        return

    from rich.progress import track

    methods = ["soft", "sdpa", "naive softmax", "softmax nystrom"]
    sides = [s for s in GRIDS if s * s <= args.max_n]
    results: dict[str, dict[int, dict]] = {m: {} for m in methods}
    jobs = [(m, s) for s in sides for m in methods]
    for method, side in track(jobs, description="attention sweep"):
        n = side * side
        if method == "naive softmax" and HEADS * n * n * 4 * 2 > NAIVE_LIMIT_BYTES:
            continue  # the n x n scores (plus softmax output) would not fit
        out = subprocess.run([sys.executable, __file__, "--worker", method, str(side), "--repeat",
                              str(args.repeat)], capture_output=True, text=True, check=True)
        results[method][n] = json.loads(out.stdout.strip().splitlines()[-1])

    ns = [s * s for s in sides]
    rows = []
    for n in ns:
        soft_ms = results["soft"][n]["ms"]
        row = [n]
        for m in methods:
            r = results[m].get(n)
            row += [f"{r['ms']:.1f} ms / {r['peak_mib']:.0f} MiB" if r else "skipped (n^2 too large)"]
        row.append(f"{results['sdpa'][n]['ms'] / soft_ms:.1f}x")
        rows.append(row)
    growth = [results["soft"][b]["ms"] / results["soft"][a]["ms"] for a, b in itertools.pairwise(ns)]
    title = f"attention, {HEADS} heads x {DIM} dims, {LANDMARKS} landmarks, CPU: time / peak memory"
    path = report("soft_attention", title, ["tokens n", *methods, "SDPA / SOFT"], rows,
                  extra={"results": {m: {str(n): r for n, r in v.items()} for m, v in results.items()},
                         "soft_time_growth_per_4x_tokens": growth})
    print("SOFT time growth per 4x tokens: " + ", ".join(f"{g:.2f}x" for g in growth))
    plot(path)


if __name__ == "__main__":
    main()
