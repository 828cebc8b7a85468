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
    """A bar over training steps showing loss, validation loss and tokens/s."""

    def __init__(self, total: int, completed: int = 0, description: str = "train", enabled: bool = True):
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
            TextColumn("{task.fields[tok_s]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, disable=not enabled,
        )
        self._task = self._progress.add_task(description, total=total, completed=completed,
                                             loss="-", val="-", tok_s="-")

    def update(self, step: int, loss: float, tokens_per_s: float, val_loss: float | None) -> None:
        self._progress.update(self._task, completed=step, loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                              val="-" if val_loss is None else f"{val_loss:.3f}")

    def __enter__(self) -> TrainProgress:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()
