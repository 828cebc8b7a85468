"""Progress bars (rich) shared by trainers, benchmarks and the demo."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class TrainProgress:
    """A bar over training steps showing loss, validation loss and throughput (tokens/s, images/s ...)."""

    def __init__(self, total: int, completed: int = 0, description: str = "train", enabled: bool = True,
                 unit: str = "tok/s", val_label: str = "val"):
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn(val_label + " {task.fields[val]}"),
            TextColumn("{task.fields[rate]} " + unit), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console, disable=not enabled,
        )
        self._task = self._progress.add_task(description, total=total, completed=completed,
                                             loss="-", val="-", rate="-", status="")

    def update(self, step: int, loss: float, rate: float, val: float | None, status: str = "") -> None:
        """``status``: a short extra column (e.g. peak memory and MFU)."""
        self._progress.update(self._task, completed=step, loss=f"{loss:.3f}", rate=f"{rate:,.0f}",
                              val="-" if val is None else f"{val:.3f}", status=status)

    def __enter__(self) -> TrainProgress:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()
