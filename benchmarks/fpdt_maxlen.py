"""FPDT vs plain training, activation checkpointing and Ulysses: longest sequence under one memory budget, and speed.

    python benchmarks/fpdt_maxlen.py --part memory [--budget-mib 256 --max-len 65536]
    python benchmarks/fpdt_maxlen.py --part throughput [--seq-len 2048]
    python benchmarks/fpdt_maxlen.py --part plan-check     (the memory model against the memory part's points)
    python benchmarks/fpdt_maxlen.py --plot-only           (redraw fpdt_maxlen.png from results/fpdt_maxlen.json)

memory: for each method, a doubling search over sequence lengths. Every
(method, length) runs one training step (forward, backward, AdamW) in a fresh
process (two under torchrun for SP=2) and reports the peak RSS above the RSS
just before the step (max over ranks); a method stops at the first length
whose peak exceeds the budget. Every process fixes glibc's mmap threshold
(``release_large_frees``) so freed buffers do not linger in any method's RSS.

throughput: tokens/s of one training step at a length every method fits,
interleaved rounds in one process, and MFU against a large-GEMM FLOP/s
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from harness import RESULTS, add_plot_only, load_results, report, time_interleaved

from effdl.core.config import ModelConfig
from effdl.fpdt.measure import (
    MiB,
    gemm_flops,
    loss_fn_for,
    measure_step,
    measure_step_fresh,
    release_large_frees,
    train_flops_per_token,
    warmed_model,
)
from effdl.fpdt.pipeline import FPDTConfig
from effdl.report import line_plot

# (label, method, sp ranks, offload)
METHODS = [
    ("plain", "plain", 1, None),
    ("checkpointing", "checkpoint", 1, None),
    ("Ulysses SP=2", "ulysses", 2, None),
    ("FPDT SP=1 (disk)", "fpdt", 1, "disk"),
    ("FPDT SP=2 (disk)", "fpdt", 2, "disk"),
]


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4, ffn_dim=int(args.dim * 8 / 3),
                       vocab_size=258, max_seq_len=1 << 24)


def run_child(method: str, sp: int, offload: str | None, seq_len: int, args: argparse.Namespace) -> dict:
    """One (method, length) measurement in a fresh process (``sp`` under torchrun)."""
    chunk = min(args.chunk, seq_len)
    fpdt = FPDTConfig(chunk_size=chunk, offload=offload or "disk", sp_size=sp)
    result = measure_step_fresh(method, model_config(args), seq_len, fpdt, ranks=sp, warm_len=chunk)
    return {"peak_mib": result.peak_bytes / MiB, "step_s": result.step_s}


def plot(path: Path = RESULTS / "fpdt_maxlen.json") -> None:
    """Draw fpdt_maxlen.png (peak memory by length, per method, and the budget) from the memory part's JSON."""
    results = load_results(path)
    points = results["points"]
    series = {label: ([p["seq_len"] for p in pts], [p["peak_mib"] for p in pts]) for label, pts in points.items()}
    start = min(p["seq_len"] for pts in points.values() for p in pts)
    series[f"{results['budget_mib']:g} MiB budget"] = ([start, results["max_len"]], [results["budget_mib"]] * 2)
    line_plot(RESULTS / "fpdt_maxlen.png", series,
              title=f"Peak memory of one training step (search capped at {results['max_len']:,} tokens)",
              xlabel="sequence length (tokens, log scale)", ylabel="peak RSS above pre-step RSS (MiB, log scale)",
              logx=True, logy=True)


def memory_part(args: argparse.Namespace) -> None:
    from rich.progress import Progress

    points: dict[str, list[dict]] = {}
    rows = []
    with Progress() as progress:
        task = progress.add_task("doubling search", total=len(METHODS))
        for label, method, sp, offload in METHODS:
            points[label], seq_len, longest = [], args.start_len, 0
            while seq_len <= args.max_len:
                progress.update(task, description=f"{label} at {seq_len:,} tokens")
                result = run_child(method, sp, offload, seq_len, args)
                points[label].append({"seq_len": seq_len, **result})
                if result["peak_mib"] > args.budget_mib:
                    break
                longest = seq_len
                seq_len *= 2
            capped = longest == args.max_len
            rows.append([label, longest, "yes" if capped else "no",
                         next((p["peak_mib"] for p in points[label] if p["seq_len"] == longest), float("nan"))])
            progress.advance(task)
    plain, ckpt = rows[0][1], rows[1][1]
    for row in rows:
        row += [row[1] / plain if plain else float("nan"), row[1] / ckpt if ckpt else float("nan")]
    plot(report("fpdt_maxlen", f"Longest trainable sequence under {args.budget_mib} MiB of activation memory "
                f"(dim {args.dim}, {args.layers} layers, batch 1, chunk {args.chunk})",
                ["method", "max tokens", "hit --max-len", "peak MiB there", "x plain", "x checkpointing"], rows,
                extra={"budget_mib": args.budget_mib, "max_len": args.max_len, "chunk": args.chunk,
                       "points": points}))


def throughput_part(args: argparse.Namespace) -> None:
    release_large_frees()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = model_config(args)
    chunk = min(args.chunk, args.seq_len)
    variants = {
        "plain": loss_fn_for("plain"),
        "checkpointing": loss_fn_for("checkpoint"),
        "FPDT (none)": loss_fn_for("fpdt", FPDTConfig(chunk_size=chunk, offload="none")),
        "FPDT (disk)": loss_fn_for("fpdt", FPDTConfig(chunk_size=chunk, offload="disk")),
    }
    steps = {}
    for name, fn in variants.items():
        model, optimizer = warmed_model(cfg, fn, warm_len=chunk)
        steps[name] = lambda m=model, o=optimizer, f=fn: measure_step(m, o, f, args.seq_len)
    timings = time_interleaved(steps, warmup=1, repeat=args.repeat)
    peak = gemm_flops()
    flops_per_token = train_flops_per_token(cfg, args.seq_len)
    base = args.seq_len / timings["plain"].median_s
    rows = []
    for name, t in timings.items():
        tps = args.seq_len / t.median_s
        rows.append([name, tps, tps / base, 100 * tps * flops_per_token / peak, f"{100 * t.spread:.0f}%"])
    report("fpdt_throughput", f"Training tokens/s at {args.seq_len:,} tokens (chunk {chunk}), "
           f"GEMM peak {peak / 1e9:.0f} GFLOP/s", ["method", "tokens/s", "x plain", "MFU %", "IQR"], rows,
           extra={"gemm_flops": peak, "seq_len": args.seq_len, "timings": timings})


def plan_check_part(args: argparse.Namespace) -> None:
    """The analytic memory model (``effdl fpdt plan``) against every point the memory part measured."""
    from effdl.fpdt.plan import activation_bytes

    measured = json.loads((RESULTS / "fpdt_maxlen.json").read_text())
    cfg = model_config(args)
    rows = []
    for label, method, sp, _ in METHODS:
        for point in measured["points"][label]:
            predicted = activation_bytes(method, cfg, point["seq_len"], sp, measured["chunk"]) / MiB
            rows.append([label, point["seq_len"], point["peak_mib"], predicted, predicted / point["peak_mib"]])
    worst = max(abs(r[4] - 1) for r in rows)
    report("fpdt_plan_check", f"Memory model vs measured peak (worst error {100 * worst:.0f}%)",
           ["method", "tokens", "measured MiB", "predicted MiB", "predicted / measured"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["memory", "throughput", "plan-check"], default="memory")
    parser.add_argument("--budget-mib", type=float, default=256)
    parser.add_argument("--start-len", type=int, default=1024)
    parser.add_argument("--max-len", type=int, default=65536)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=5)
    add_plot_only(parser)
    args = parser.parse_args()
    if args.plot_only:
        plot()
        return
    started = time.perf_counter()
    {"memory": memory_part, "throughput": throughput_part, "plan-check": plan_check_part}[args.part](args)
    print(f"done in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
