"""Tables and plots for people: rich tables on the terminal, markdown tables and PNG plots on disk.

Shared by ``effdl demo`` and the scripts in ``benchmarks/``.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

# Results go to stdout, wide enough for a table of numbers even when piped.
console = Console(width=max(Console().width, 120))

Row = Sequence[Any]


def machine_info() -> dict[str, Any]:
    """What a timing depends on: CPU model, threads, torch version, accelerator."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def print_table(title: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == columns[0] else "right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    console.print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, tight: bool = True) -> Path:
    if tight:  # not with a colorbar shared by several axes, which tight_layout cannot place
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def bar_plot(path: str | Path, categories: Sequence[str], series: dict[str, Sequence[float]], *, title: str,
             ylabel: str) -> Path:
    """One PNG of grouped bars: a group per category, a bar per named series."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.2), dpi=110)
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(categories)), categories)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _save(fig, path)


def line_plot(path: str | Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
              xlabel: str, ylabel: str, logx: bool = False, logy: bool = False) -> Path:
    """One PNG with a line per named (xs, ys) series."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.2), dpi=110)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) <= 20 else None, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def heatmaps(path: str | Path, matrices: Sequence[Any], titles: Sequence[str], *, title: str, xlabel: str,
             ylabel: str, colorbar: str) -> Path:
    """One PNG with a heatmap per matrix, side by side, on a shared colour scale."""
    n = len(matrices)
    fig, axes = _pyplot().subplots(1, n, figsize=(3.4 * n + 0.8, 3.6), dpi=110, squeeze=False)
    vmax = max(float(m.max()) for m in matrices)
    for ax, matrix, sub in zip(axes[0], matrices, titles, strict=True):
        image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set(title=sub, xlabel=xlabel)
    axes[0][0].set_ylabel(ylabel)
    fig.colorbar(image, ax=axes[0].tolist(), label=colorbar, shrink=0.85)
    fig.suptitle(title)
    return _save(fig, path, tight=False)
