"""Flover under Poisson arrivals: fused vs static vs sequential serving, replayed in real time.

Measures the model's single-step decode time at batch 1, then replays one
seeded Poisson workload (the same prompts and lengths at every load) with
mean arrival intervals of ``--multiples`` of that step, dense to sparse,
against an in-process AsyncEngine under each policy: fused with and without
the memory shuffle, static (dynamic batching with a batch window of a few
decode steps) and sequential. Reports makespan, E2E latency, TTFT and output
throughput per policy, and how much faster fused is. Every policy must
produce the same greedy tokens for every request; a difference is an engine
bug and stops the run.

    python benchmarks/flover_poisson.py [--preset small --requests 32 --multiples 1 4 16 64 256] [--quick]
    python benchmarks/flover_poisson.py --plot-only     # redraw the PNG from results/flover_poisson.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness import RESULTS, add_plot_only, load_results, report
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from effdl.core.config import ModelConfig
from effdl.core.transformer import Transformer
from effdl.flover import Engine
from effdl.flover.async_engine import AsyncEngine
from effdl.flover.workload import RequestMetrics, WorkloadRequest, poisson_workload, replay, summarize
from effdl.progress import console
from effdl.report import line_plot

FUSED = "fused"


def policies(step_s: float, static_window_steps: float) -> dict[str, dict[str, Any]]:
    """Engine settings per policy name; the first is the one the others are compared with."""
    return {
        FUSED: dict(policy="fused", shuffle=True),
        "fused, no shuffle": dict(policy="fused", shuffle=False),
        "static": dict(policy="static", batch_window_s=static_window_steps * step_s),
        "sequential": dict(policy="sequential"),
    }


def decode_step_s(model: Transformer, prompt_len: int, max_len: int) -> float:
    """One decode step at batch 1 as served: the median gap between tokens of a lone request.

    Measured through the AsyncEngine rather than by timing ``Engine.step`` here
    because the engine steps in its own thread, and torch's intra-op threading
    can behave very differently there: on a loaded 2-core CPU a tiny-preset
    step took ~48 ms in the main thread and ~5 ms in a worker thread.
    """
    lone = [WorkloadRequest(0.0, [1] * prompt_len, max_len - prompt_len)]
    (metrics,) = asyncio.run(serve(model, dict(policy="fused"), lone, 1, max_len, lambda _: None))
    return statistics.median(b - a for a, b in itertools.pairwise(metrics.token_times_s))


async def serve(model: Transformer, settings: dict[str, Any], workload: list[WorkloadRequest], max_slots: int,
                max_len: int, on_finish: Callable[[RequestMetrics], None]) -> list[RequestMetrics]:
    """Replay ``workload`` against a fresh engine with ``settings``."""
    engine = AsyncEngine(Engine(model, max_slots=max_slots, max_len=max_len, **settings)).start()
    try:
        return await replay(workload, engine, timeout_s=600.0, on_finish=on_finish)
    finally:
        await engine.shutdown()


def check_run(metrics: list[RequestMetrics], workload: list[WorkloadRequest], reference: list[list[int]] | None,
              label: str) -> None:
    """Every request completed with its length, with the reference run's greedy tokens (when there is one)."""
    for m, request in zip(metrics, workload, strict=True):
        if m.error or m.num_output_tokens != request.max_tokens:
            raise AssertionError(f"{label}: request {m.index} ended with {m.num_output_tokens} of "
                                 f"{request.max_tokens} tokens, error {m.error!r}")
        if reference is not None and m.output_ids != reference[m.index]:
            first = next(i for i, (a, b) in enumerate(zip(m.output_ids, reference[m.index], strict=True)) if a != b)
            raise AssertionError(f"{label}: request {m.index} differs from the first run from output token {first}: "
                                 f"{m.output_ids[first:first + 8]} vs {reference[m.index][first:first + 8]}")


def plot(path: Path = RESULTS / "flover_poisson.json") -> None:
    """Draw the PNG beside ``path``: fused's speedup over static and sequential per arrival interval."""
    results = load_results(path)
    at: dict[float, dict[str, dict]] = {}
    for run in results["runs"]:
        at.setdefault(run["multiple"], {})[run["policy"]] = run["summary"]
    metrics = {"makespan": "makespan_s", "mean E2E": "mean_e2e_s"}
    speedups = {f"vs {policy}: {metric}": (list(at), [s[policy][key] / s[FUSED][key] for s in at.values()])
                for policy in ("static", "sequential") for metric, key in metrics.items()}
    line_plot(path.with_suffix(".png"), speedups, title=results["title"],
              xlabel="mean arrival interval (decode steps, log scale)",
              ylabel="fused speedup (x; above 1 = fused faster)", logx=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--multiples", type=float, nargs="+", default=[1, 4, 16, 64, 256],
                        help="mean arrival intervals, in single-request decode steps")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128])
    parser.add_argument("--output-len", type=int, nargs=2, default=[16, 64])
    parser.add_argument("--max-slots", type=int, default=32)
    parser.add_argument("--static-window-steps", type=float, default=4.0,
                        help="static batching waits this many decode steps for a batch to fill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny preset, 8 requests, 2 intervals")
    add_plot_only(parser)
    args = parser.parse_args()
    if args.plot_only:
        plot()
        return
    if args.quick:
        args.preset, args.requests, args.multiples = "tiny", 8, [1, 16]
    name = "flover_poisson_quick" if args.quick else "flover_poisson"  # a smoke run never overwrites results

    torch.manual_seed(args.seed)
    model = Transformer(ModelConfig.preset(args.preset))
    model.reset_parameters(std=0.1)  # wider than training init so greedy picks are not near-ties across batches
    model.eval()
    max_len = args.prompt_len[1] + args.output_len[1]
    step_s = decode_step_s(model, sum(args.prompt_len) // 2, max_len)
    console.print(f"{args.preset}: one decode step at batch 1 takes {step_s * 1e3:.2f} ms")
    settings = policies(step_s, args.static_window_steps)

    runs, reference = [], None
    bar = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*bar, console=console) as progress:
        task = progress.add_task("replay", total=len(args.multiples) * len(settings) * args.requests)
        for multiple in args.multiples:
            interval_ms = multiple * step_s * 1e3
            workload = poisson_workload(args.requests, interval_ms, tuple(args.prompt_len), tuple(args.output_len),
                                        seed=args.seed)
            for policy, engine_settings in settings.items():
                label = f"interval {multiple:g} steps, {policy}"
                progress.update(task, description=label)
                metrics = asyncio.run(serve(model, engine_settings, workload, args.max_slots, max_len,
                                            lambda _: progress.advance(task)))
                check_run(metrics, workload, reference, label)
                reference = reference or [m.output_ids for m in metrics]
                runs.append({"multiple": multiple, "interval_ms": interval_ms, "policy": policy,
                             "summary": summarize(metrics)})

    rows = []
    for multiple in args.multiples:
        at = {r["policy"]: r["summary"] for r in runs if r["multiple"] == multiple}
        for policy, s in at.items():
            makespan_x = s["makespan_s"] / at[FUSED]["makespan_s"]
            latency_x = s["mean_e2e_s"] / at[FUSED]["mean_e2e_s"]
            rows.append((f"{multiple:g}", multiple * step_s * 1e3, policy, s["makespan_s"],
                         s["mean_e2e_s"], s["p99_e2e_s"], s["mean_ttft_s"], s["output_throughput"],
                         f"{makespan_x:.2f}x", f"{latency_x:.2f}x"))

    title = (f"Flover, Poisson arrivals: {args.preset}, {args.requests} requests, {args.max_slots} slots, "
             f"decode step {step_s * 1e3:.2f} ms")
    columns = ["interval steps", "interval ms", "policy", "makespan s", "mean E2E s", "p99 E2E s", "mean TTFT s",
               "output tok/s", "fused speedup: makespan", "fused speedup: mean E2E"]
    plot(report(name, title, columns, rows,
                extra={"args": vars(args), "decode_step_s": step_s, "same_greedy_tokens": True, "runs": runs}))


if __name__ == "__main__":
    main()
