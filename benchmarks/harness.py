"""Shared benchmark plumbing: warm-up + repeated timing, a machine header, JSON + PNG under results/."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from effdl.report import machine_info, print_table

RESULTS = Path(__file__).parent / "results"


@dataclass
class Timing:
    median_s: float
    p25_s: float
    p75_s: float
    samples: list[float]

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.p75_s - self.p25_s) / self.median_s


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int = 2, repeat: int = 7) -> dict[str, Timing]:
    """Time several callables side by side: after ``warmup`` untimed rounds, ``repeat`` rounds that each
    run every callable once, so drifts in machine speed (frequency, other load) hit all of them alike.
    Wall clock, CUDA synchronised."""
    import torch

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: _timing(s) for name, s in samples.items()}


def _timing(samples: list[float]) -> Timing:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return Timing(statistics.median(samples), q[0], q[2], samples)


def report(name: str, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
           extra: dict[str, Any] | None = None) -> Path:
    """Print the table with a machine header and write ``results/<name>.json``; returns the JSON path."""
    machine = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    print_table(title, columns, rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"title": title, "machine": machine, "columns": list(columns), "rows": [list(r) for r in rows],
               **(extra or {})}
    path.write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o)) + "\n")
    return path


def add_plot_only(parser: argparse.ArgumentParser) -> None:
    """``--plot-only``: redraw a benchmark's PNGs from its existing ``results/*.json`` without measuring."""
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the PNG(s) from the existing results/*.json without measuring anything")


def load_results(path: str | Path) -> dict[str, Any]:
    """A ``results/<name>.json`` as :func:`report` wrote it."""
    return json.loads(Path(path).read_text())


@contextmanager
def headroom(fraction: float = 0.3) -> Iterator[None]:
    """Plots drawn inside leave ``fraction`` of the data range empty above the data (and below, where the
    axis does not start at a bar's 0), so the legend that effdl.report places has room covering nothing."""
    import matplotlib

    with matplotlib.rc_context({"axes.ymargin": fraction}):
        yield


def resumable_checkpoint(out_dir: str | Path, model: str, config: dict[str, Any]) -> Path | None:
    """The newest ``<model>-step*.pth`` in ``out_dir`` trained with exactly ``config``, so a rerun continues it."""
    import torch

    for path in sorted(Path(out_dir).glob(f"{model}-step*.pth"), reverse=True):
        if torch.load(path, weights_only=True)["config"] == config:
            return path
    return None
