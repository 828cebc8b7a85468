"""Shared benchmark plumbing: warm-up + repeated timing, a machine header, JSON + PNG under results/."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from effdl.report import machine_info, print_table
from effdl.timing import time_interleaved  # noqa: F401  (the benchmarks' timing, shared with effdl demo)

RESULTS = Path(__file__).parent / "results"


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


def resumable_checkpoint(out_dir: str | Path, trainer: str, config: dict[str, Any]) -> Path | None:
    """The newest checkpoint in run folder ``out_dir`` that ``trainer`` wrote with exactly ``config``, so a rerun
    continues it."""
    from effdl.train.checkpoint import TRAINER_STATE_FILE, read_trainer_state

    for folder in sorted(Path(out_dir).glob("checkpoint-*"), reverse=True):
        if (folder / TRAINER_STATE_FILE).is_file() and read_trainer_state(folder, trainer)["config"] == config:
            return folder
    return None


def train_resumably(train: Callable[..., Any], cfg: Any, trainer: str) -> tuple[Any, Path]:
    """Run ``train(cfg, resume=...)`` (a system's trainer, e.g. ``train_detector``) from the newest checkpoint of
    the same config in ``cfg.out_dir``, so a rerun continues or reuses a run; returns its ``TrainResult`` and final
    checkpoint.

    The run's older checkpoints are deleted afterwards: a benchmark reads only the last one and ``history.json``,
    and each holds the optimizer state (180 MB for a ResNet-18 detector), which filled the disk at 20 epochs.
    """
    resume = resumable_checkpoint(cfg.out_dir, trainer, dataclasses.asdict(cfg))
    result = train(cfg, resume=resume)
    final = result.checkpoint or resume
    for folder in Path(cfg.out_dir).glob("checkpoint-*"):
        if folder.name < final.name:
            shutil.rmtree(folder)
    return result, final
