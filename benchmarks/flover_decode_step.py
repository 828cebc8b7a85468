"""Where a Flover decode step's time goes, on three runner paths in the same run.

The paths: the model's own linears with masked SDPA; oneDNN-packed linears with masked SDPA (the runner before
the live-length kernel); packed linears with ``decode_attention``, each row attending over its own length (the
runner's default). The model of ``flover_vs_vllm.py`` (33.7M-param Llama, fp32) in an in-process ``Engine``:
``rows`` requests with prompts of 16-127 tokens decode greedily together. Reports the median decode step per
batch size for every path (interleaved, so a busy machine slows all alike), and at the largest batch the share of
each operator (torch.profiler) and of Python around them, for the last two paths: the breakdown before and after.
Shares are of the profiled steps' wall time.

    python benchmarks/flover_decode_step.py [--rows 1 4 8 32 --steps 30]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from flover_vs_vllm import MODEL
from harness import RESULTS, report
from torch.profiler import ProfilerActivity, profile

from effdl.core.transformer import Transformer
from effdl.flover.engine import Engine
from effdl.flover.request import SamplingParams
from effdl.report import bar_plot

# path -> (packed linears, live-length decode attention)
PATHS = {"model's linears": (False, False), "oneDNN packed": (True, False), "packed + live-length": (True, True)}


def running_engine(model: Transformer, rows: int, path: str, max_tokens: int) -> Engine:
    """An engine on ``path`` whose ``rows`` requests are all past prefill, so that every further step is a decode."""
    engine = Engine(model, None, max_slots=32, max_len=512)
    packed, live = PATHS[path]
    if not packed:
        engine.runner.linears = None
    engine.runner.live_decode &= live
    rng = random.Random(0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for _ in range(rows):
        engine.add_request([rng.randrange(MODEL.vocab_size) for _ in range(rng.randint(16, 127))], params)
    while any(not r.output for r in engine.requests.values()):
        engine.step()
    return engine


def step_times(model: Transformer, rows: int, steps: int) -> dict[str, float]:
    """Median decode-step seconds per path, the two paths' steps interleaved."""
    engines = {path: running_engine(model, rows, path, steps + 2) for path in PATHS}
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(steps):
        for path, engine in engines.items():
            start = time.perf_counter()
            engine.step()
            times[path].append(time.perf_counter() - start)
    return {path: statistics.median(t) for path, t in times.items()}


def breakdown(model: Transformer, rows: int, path: str, steps: int = 10) -> dict[str, float]:
    """Share of each top operator, and of everything else, in ``steps`` profiled decode steps on ``path``."""
    engine = running_engine(model, rows, path, steps + 2)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    wall = time.perf_counter() - start
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:4])
    shares = {name: seconds / wall for name, seconds in top.items()}
    shares["everything else (Python, small ops)"] = 1 - sum(shares.values())
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Transformer(MODEL).eval()
    medians = {rows: step_times(model, rows, args.steps) for rows in args.rows}
    names = list(PATHS)
    rows = [(n, *(f"{1e3 * m[path]:.1f}" for path in names), f"{m[names[0]] / m[names[1]]:.2f}x",
             f"{m[names[1]] / m[names[2]]:.2f}x") for n, m in medians.items()]
    breakdown(model, 1, names[0], steps=2)  # the profiler's own start-up, kept out of the shares below
    shares = {path: breakdown(model, max(args.rows), path) for path in names[1:]}
    for path, parts in shares.items():
        rows += [(f"{max(args.rows)} rows, {path}: {name}", "", "", "", "", f"{100 * share:.0f}%")
                 for name, share in parts.items()]
    report("flover_decode_step", f"Flover decode step, {MODEL.num_params() / 1e6:.1f}M Llama fp32 (median ms)",
           ["rows", *(f"{path} ms" for path in names), "packed speedup", "live-length speedup / share"], rows,
           extra={"medians_s": {str(k): v for k, v in medians.items()}, "breakdown": shares})
    bar_plot(RESULTS / "flover_decode_step.png", [f"{n} rows" for n in medians],
             {path: [1e3 * m[path] for m in medians.values()] for path in names},
             title="Flover decode step by runner path (lower is better)", ylabel="median ms per step",
             value_format="{:.1f}")


if __name__ == "__main__":
    main()
