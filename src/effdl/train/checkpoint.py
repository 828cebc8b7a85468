"""The one checkpoint format of every effdl trainer.

A run folder holds one ``checkpoint-<step>`` folder per save and a
``history.json`` (every step's loss and every evaluation). Each checkpoint
folder holds:

- the weights, in the form the model's own ecosystem loads: HF files
  (``config.json`` + ``model.safetensors``) for language models, a plain
  state dict in ``model.safetensors`` for timm and torchvision models (timm:
  ``pretrained_cfg_overlay={"file": ".../model.safetensors"}``);
- ``trainer_state.pt``: the step, optimizer state, the trainer's config,
  the loss and evaluation record, which trainer wrote it, and any extras
  the system needs to rebuild its model (e.g. category names).

That is everything an exact resume needs, since every batch is a pure
function of (seed, step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from effdl.errors import EffdlError

TRAINER_STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"
HISTORY_FILE = "history.json"


def checkpoint_folder(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step:06d}"


def save_state_dict(model: nn.Module, folder: Path) -> None:
    """The model's state dict as ``folder/model.safetensors`` (tensors moved to the CPU, made contiguous)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE),
              metadata={"format": "pt"})


def read_weights(folder: str | Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The state dict ``save_state_dict`` wrote into a checkpoint folder."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise EffdlError(f"{folder} holds no {WEIGHTS_FILE}")
    return load_file(str(path), device=str(device))


def write_history(out_dir: str | Path, losses: list[tuple[int, float]], evals: list[dict[str, Any]]) -> None:
    (Path(out_dir) / HISTORY_FILE).write_text(json.dumps({"losses": losses, "evals": evals}, indent=1))


def latest_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint folder, else the newest ``checkpoint-*`` folder of the run ``path``."""
    path = Path(path)
    if (path / TRAINER_STATE_FILE).is_file():
        return path
    if not path.exists():
        raise EffdlError(f"checkpoint {path} does not exist")
    candidates = sorted(p for p in path.glob("checkpoint-*") if (p / TRAINER_STATE_FILE).is_file())
    if not candidates:
        raise EffdlError(f"{path} is neither a checkpoint folder nor a run folder holding checkpoint-* folders")
    return candidates[-1]


def read_trainer_state(path: str | Path, trainer: str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The ``trainer_state.pt`` of checkpoint (or newest checkpoint of run) ``path``, written by ``trainer``.

    ``trainer`` is the command that writes such checkpoints (``"effdl soft train"``); a checkpoint of another
    trainer is refused by name, so a detector checkpoint never loads as a classifier.
    """
    folder = latest_checkpoint(path)
    state = torch.load(folder / TRAINER_STATE_FILE, map_location=device, weights_only=True)
    if state.get("trainer") != trainer:
        raise EffdlError(f"{folder} was written by `{state.get('trainer')}`, not by `{trainer}`")
    return {**state, "folder": folder}


def saved_config(path: str | Path, trainer: str) -> dict[str, Any]:
    """The config (as a dict) that checkpoint or run ``path`` was trained with, for resuming with overrides."""
    return read_trainer_state(path, trainer)["config"]
