"""Where Flover's step time goes on the flover_vs_vllm workload, this checkout against an earlier commit.

Replays the Poisson workload of ``flover_vs_vllm.py`` (same seeded 33.7M Llama, 32 requests, prompts 16-127,
64 greedy tokens) into an in-process ``Engine`` in real time, no HTTP, and times every step by kind: decode only,
or mixed (prefill chunks and decode rows in one step). Each code version runs in its own process, the baseline
from a ``git worktree`` of ``--baseline`` (default 4212253, the last commit that ran prefill chunks and the decode
batch as separate forwards), one after the other so they never share the CPU.

    python benchmarks/flover_step_mix.py [--baseline REF --intervals 10 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import RESULTS, report

from effdl.report import bar_plot

HERE = Path(__file__).parent
KINDS = ("decode only", "mixed")
OUTPUT_LEN = 64  # greedy tokens per request, as in flover_vs_vllm.py


def replay(interval_ms: float) -> dict:
    """Step times by kind, output tokens/s and mean TPOT for one in-process replay (runs the imported effdl)."""
    import torch
    from flover_vs_vllm import MODEL

    from effdl.core.transformer import Transformer
    from effdl.flover.engine import Engine
    from effdl.flover.request import SamplingParams
    from effdl.flover.workload import poisson_workload

    torch.manual_seed(0)
    model = Transformer(MODEL)
    model.reset_parameters(std=0.1)
    engine = Engine(model.eval(), None, max_slots=32, max_len=512)
    workload = poisson_workload(32, interval_ms, (16, 127), (OUTPUT_LEN, OUTPUT_LEN), MODEL.vocab_size, 0)
    params = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)
    for r in workload[:4]:  # warm-up, as the server benchmark does
        engine.add_request(r.prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()

    steps: dict[str, list[float]] = {kind: [] for kind in KINDS}
    execute = engine.runner.execute

    def timed(plan):
        start = time.perf_counter()
        result = execute(plan)
        if plan.decode is not None:
            steps[KINDS[1] if plan.prefill else KINDS[0]].append(time.perf_counter() - start)
        return result

    engine.runner.execute = timed
    first, done, sent = {}, {}, 0
    start = time.monotonic()
    while sent < len(workload) or engine.has_unfinished():
        now = time.monotonic() - start
        while sent < len(workload) and workload[sent].arrival_s <= now:
            engine.add_request(workload[sent].prompt, params)
            sent += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, workload[sent].arrival_s - now))
            continue
        for out in engine.step().outputs:
            first.setdefault(out.id, time.monotonic())
            if out.finished:
                done[out.id] = time.monotonic()
    wall = time.monotonic() - start
    return {"tokens_per_s": OUTPUT_LEN * len(workload) / wall,
            "mean_tpot_ms": 1e3 * statistics.mean((done[r] - first[r]) / (OUTPUT_LEN - 1) for r in done),
            "steps": {kind: {"count": len(t), "mean_ms": 1e3 * statistics.mean(t) if t else 0.0,
                             "total_s": sum(t)} for kind, t in steps.items()}}


def run_version(src: Path | None, intervals: list[float]) -> dict:
    """``replay`` at each interval in a child process importing effdl from ``src`` (None: this checkout)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src) if src else None, str(HERE)]))}
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, intervals)], env=env, check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.splitlines()[-1])
    if src is not None and not Path(result["effdl"]).is_relative_to(src):
        raise RuntimeError(f"the baseline process imported effdl from {result['effdl']}, not from {src}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="4212253", help="git ref of the code to compare against")
    parser.add_argument("--intervals", type=float, nargs="+", default=[10.0, 100.0])
    parser.add_argument("--child", type=float, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import effdl

        print(json.dumps({"effdl": effdl.__file__, **{f"{i:g}": replay(i) for i in args.child}}))
        return
    repo = HERE.parent
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", worktree, args.baseline], check=True,
                       capture_output=True)
        try:
            versions = {f"baseline {args.baseline}": run_version(worktree / "src", args.intervals),
                        "this checkout": run_version(None, args.intervals)}
        finally:
            subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", worktree], check=True)
    rows = []
    for interval in map("{:g}".format, args.intervals):
        for name, by_interval in versions.items():
            r = by_interval[interval]
            rows.append((interval, name, f"{r['tokens_per_s']:.0f}", f"{r['mean_tpot_ms']:.1f}",
                         *(f"{r['steps'][k]['count']} x {r['steps'][k]['mean_ms']:.1f}" for k in KINDS),
                         *(f"{r['steps'][k]['total_s']:.2f}" for k in KINDS)))
    report("flover_step_mix", "Flover in process on the flover_vs_vllm workload: steps by kind",
           ["interval ms", "code", "out tok/s", "mean TPOT ms", "decode-only steps x ms", "mixed steps x ms",
            "decode-only s", "mixed s"], rows, extra={"versions": versions})
    bar_plot(RESULTS / "flover_step_mix.png", [f"{i:g} ms, {kind}" for i in args.intervals for kind in KINDS],
             {name: [v[f"{i:g}"]["steps"][kind]["mean_ms"] for i in args.intervals for kind in KINDS]
              for name, v in versions.items()},
             title="Flover step time by kind, in process (lower is better)", ylabel="mean ms per step",
             value_format="{:.0f}")


if __name__ == "__main__":
    main()
