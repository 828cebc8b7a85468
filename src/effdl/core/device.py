"""Where a model runs: one rule for every entry point, training or serving."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the first GPU if there is one, else the CPU; any other name as torch spells it (``"cuda:1"``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
