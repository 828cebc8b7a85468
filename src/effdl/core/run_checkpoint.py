"""What the epoch-based image trainers (``effdl.soft``, ``effdl.sprnet``) share: batch order and checkpoints.

Both resume exactly: the batch of step n is a pure function of the seed and
n, and a checkpoint is one ``<name>-step<n>.pth`` holding weights, optimizer
state, config, history and every step's loss, with the history also written
beside it as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from effdl.errors import EffdlError


def epoch_steps(num_items: int, batch_size: int) -> int:
    """Steps in one epoch of ``epoch_batches``: full batches only (a ragged tail is skipped), at least one."""
    return max(1, num_items // batch_size)


def epoch_batches(num_items: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Tensor]:
    """Endless item-index batches from step ``start_step`` on; epoch e walks a permutation seeded by ``seed + e``.

    Each epoch has ``epoch_steps(num_items, batch_size)`` steps, so a run resumed at any step sees exactly the
    batches an uninterrupted run would. Cost: one ``randperm(num_items)`` per epoch.
    """
    steps_per_epoch = epoch_steps(num_items, batch_size)
    step, order = start_step, None
    while True:
        epoch, within = divmod(step, steps_per_epoch)
        if within == 0 or order is None:
            order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))
        yield order[within * batch_size:(within + 1) * batch_size]
        step += 1


def save_run_checkpoint(out_dir: str | Path, name: str, step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` (which must hold ``history``) to ``out_dir/<name>-step<step>.pth``, history also as JSON."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-step{step:06d}.pth"
    torch.save({**state, "step": step}, path)
    (out_dir / f"{name}-history.json").write_text(json.dumps(state["history"], indent=1))
    return path


def restore_run(state: dict[str, Any], model: nn.Module,
                optimizer: torch.optim.Optimizer) -> tuple[int, list[dict], list[tuple[int, float]]]:
    """Load a run checkpoint's weights and optimizer state into ``model`` and ``optimizer``.

    Returns (step, history, the (step, train loss) of every step so far).
    """
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # Checkpoints written before per-step losses were kept still resume; their loss record starts empty.
    return state["step"], state["history"], state.get("losses", [])


def read_run_checkpoint(path: str | Path, required: set[str], writer: str,
                        device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint from ``save_run_checkpoint``: the file itself, or the newest one in a run folder.

    ``required`` keys must be present; ``writer`` names the command that writes such files, for the error message.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*-step*.pth"))
        if not found:
            raise EffdlError(f"{path} holds no checkpoint (*-step*.pth)")
        path = found[-1]
    if not path.is_file():
        raise EffdlError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or not {"step", *required} <= state.keys():
        raise EffdlError(f"{path} is not a checkpoint written by `{writer}`")
    return state
