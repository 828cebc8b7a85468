"""Where a model runs and in which precision: one rule for every entry point, training or serving."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the first GPU if there is one, else the CPU; any other name as torch spells it (``"cuda:1"``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device) -> torch.autocast:
    """bf16 autocast on GPUs that support it; fp32 elsewhere (CPU bf16 matmuls are slower on most CPUs)."""
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
