"""Tables and plots for people: rich tables on the terminal, markdown tables and PNG plots on disk.

Shared by ``effdl demo`` and the scripts in ``benchmarks/``.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

# Results go to stdout, wide enough for a table of numbers even when piped.
console = Console(width=max(Console().width, 120))

Row = Sequence[Any]
# matplotlib's tab10: one colour per class, the same in every panel that shows that class.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


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
    if tight:  # not for a figure with its own layout engine (``heatmaps``)
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def bar_plot(path: str | Path, categories: Sequence[str], series: dict[str, Sequence[float]], *, title: str,
             ylabel: str, hline: tuple[float, str] | None = None, value_format: str | None = None) -> Path:
    """One PNG of grouped bars: a group per category, a bar per named series; ``value_format`` (e.g. "{:.2f} s")
    writes each bar's value above it, ``hline`` draws a dashed reference line (value, legend label)."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.2), dpi=110)
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        bars = ax.bar(xs, values, width, label=name)
        if value_format is not None:
            ax.bar_label(bars, labels=[value_format.format(v) for v in values], padding=2)
    if hline is not None:
        ax.axhline(hline[0], color="black", linestyle="--", linewidth=1.2, label=hline[1])
    ax.set_xticks(range(len(categories)), categories)
    ax.set(title=title, ylabel=ylabel)
    if value_format is not None:
        ax.margins(y=0.15)  # room above the tallest bar for its label
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
    xs = sorted({x for xs, _ in series.values() for x in xs})
    if logx:
        ax.set_xscale("log", base=2)
        if len(xs) <= 12:  # ticks at the measured points, as plain numbers: "3,136" where powers of 2 say "2^11.6"
            ax.set_xticks(xs, [f"{x:,g}" for x in xs])
            ax.xaxis.set_minor_locator(_pyplot().NullLocator())
    elif all(float(x).is_integer() for x in xs):  # steps, counts: no "2.25" ticks
        ax.xaxis.get_major_locator().set_params(integer=True)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def line_panels(path: str | Path, panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], *,
                title: str, xlabel: str, ylabel: str, order: Sequence[str] = ()) -> Path:
    """One PNG of side-by-side line plots (a titled panel per entry of ``panels``), sharing the y axis; a series
    name keeps its colour in every panel. With several panels or past four series one legend sits right of the
    panels, so it hides no line.

    ``order``: series names whose colours are fixed by their place in it, whichever of them a plot holds, so that
    the plots of one benchmark agree; other names take the colours after them.
    """
    names = list(dict.fromkeys([*order, *(name for series in panels.values() for name in series)]))
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    outside = len(panels) > 1 or len(names) > 4
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(5.5 * len(panels) + 3 * outside, 4.2), dpi=110,
                                   sharey=True, squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items(), strict=True):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) <= 20 else None, label=name, color=colours[name])
        ax.set(title=panel, xlabel=xlabel)
        ax.grid(alpha=0.3)
        if all(float(x).is_integer() for xs, _ in series.values() for x in xs):  # epochs, steps: no 2.5 ticks
            ax.xaxis.get_major_locator().set_params(integer=True)
        if not outside:
            ax.legend()
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    if outside:
        handles = {label: line for ax in axes[0] for line, label in zip(*ax.get_legend_handles_labels(), strict=True)}
        legend = fig.legend(handles.values(), handles.keys(), loc="center right")
        fig.canvas.draw()  # the legend's size is known once drawn
        fig.tight_layout(rect=(0, 0, 1 - legend.get_window_extent().width / fig.bbox.width, 1))
    return _save(fig, path, tight=not outside)


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
    # Constrained layout places the shared colorbar beside the last panel, where tight_layout cannot.
    fig, axes = _pyplot().subplots(1, n, figsize=(3.2 * n + 1.0, 3.6), dpi=110, squeeze=False, layout="constrained")
    vmax = max(float(m.max()) for m in matrices)
    for ax, matrix, sub in zip(axes[0], matrices, titles, strict=True):
        image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set(title=sub, xlabel=xlabel)
    axes[0][0].set_ylabel(ylabel)
    fig.colorbar(image, ax=axes[0].tolist(), label=colorbar, shrink=0.85)
    fig.suptitle(title)
    return _save(fig, path, tight=False)


@dataclass
class BoxedImage:
    """One panel of ``boxed_images``: an image with captioned boxes, and optionally masks, drawn over it."""

    title: str
    pixels: Any  # uint8 (H, W, 3) array
    boxes: Sequence[Sequence[float]] = field(default_factory=list)  # (x0, y0, x1, y1) in the image's pixels
    captions: Sequence[str] = field(default_factory=list)  # one per box
    colors: Sequence[str] = field(default_factory=list)  # one matplotlib colour per box
    masks: Sequence[Any] = field(default_factory=list)  # none, or a bool (H, W) array per box


def caption_extent(font_size: float, dpi: float) -> tuple[float, float]:
    """(px per character, px of height) of one caption in ``boxed_images``, its padding included.

    A DejaVu Sans character is about 0.6 em wide on average; the estimate leans wide so labels never touch.
    """
    points = dpi / 72
    return 0.65 * font_size * points, 1.5 * font_size * points


def caption_tops(boxes: Sequence[Sequence[float]], captions: Sequence[str], char_px: float, line_px: float
                 ) -> list[float]:
    """The top edge (px) of each box's caption, so that no two captions overlap.

    A caption sits just above its box where that is on the image, else just
    inside its top edge; where an earlier caption holds that place, it steps
    down one line at a time until it is free. Near-duplicate boxes, as a
    short training run predicts, get stacked labels instead of one unreadable
    pile. Cost: O(n^2) for n boxes.
    """
    placed: list[tuple[float, float, float, float]] = []  # (left, right, top, bottom) of each caption so far
    tops = []
    for (x0, y0, *_), caption in zip(boxes, captions, strict=True):
        right = x0 + char_px * len(caption)
        first = y0 - line_px if y0 >= line_px else y0
        # Each placed caption blocks at most two of these steps, so one of them is free.
        for top in (first + k * line_px for k in range(2 * len(placed) + 1)):
            if all(right <= left or x0 >= r or top + line_px <= t or top >= b for left, r, t, b in placed):
                break
        placed.append((x0, right, top, top + line_px))
        tops.append(top)
    return tops


def boxed_images(path: str | Path, panels: Sequence[BoxedImage], *, title: str, font_size: int = 13) -> Path:
    """One PNG of images side by side, each shown at its own pixel size (give them already enlarged: boxes, mask
    outlines and captions are drawn at the output resolution, so they stay sharp and legible). Masks are outlined
    and lightly tinted rather than painted over, so the object under them stays visible."""
    dpi = 100
    height, width = panels[0].pixels.shape[:2]
    label = caption_extent(font_size, dpi)
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(len(panels) * (width / dpi + 0.3), height / dpi + 1.0),
                                   dpi=dpi, squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        ax.imshow(panel.pixels, interpolation="nearest")
        masks = panel.masks or [None] * len(panel.boxes)
        tops = caption_tops(panel.boxes, panel.captions, *label)
        for (x0, y0, x1, y1), caption, color, mask, top in zip(panel.boxes, panel.captions, panel.colors, masks,
                                                                tops, strict=True):
            if mask is not None and mask.any():
                ax.contourf(mask, levels=[0.5, 1.5], colors=[color], alpha=0.25)
                ax.contour(mask, levels=[0.5], colors=[color], linewidths=2)
            ax.add_patch(_pyplot().Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=2.5))
            ax.text(x0, top, caption, color="white", fontsize=font_size, va="top",
                    bbox=dict(facecolor=color, edgecolor="none", pad=1.5), clip_on=True)
        # Back to the image's own extent: patches and contours would otherwise widen the limits and shrink it.
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_title(panel.title, fontsize=font_size + 1)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=font_size + 2)
    return _save(fig, path)
