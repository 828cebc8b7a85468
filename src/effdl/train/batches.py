"""The batch order of epoch-based trainers: a pure function of (seed, step), so a resumed run sees the same batches."""

from __future__ import annotations

import torch
from torch import Tensor


def epoch_steps(num_items: int, batch_size: int) -> int:
    """Steps in one epoch of ``EpochOrder``: full batches only (a ragged tail is skipped), at least one."""
    return max(1, num_items // batch_size)


class EpochOrder:
    """``order(step)``: the item indices of ``step``'s batch; epoch e walks a permutation seeded by ``seed + e``.

    Each epoch has ``epoch_steps(num_items, batch_size)`` steps, so a run resumed at any step sees exactly the
    batches an uninterrupted run would. Cost: one ``randperm(num_items)`` per epoch visited.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.steps_per_epoch = epoch_steps(num_items, batch_size)
        self._epoch, self._permutation = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, step: int) -> Tensor:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = torch.randperm(self.num_items,
                                               generator=torch.Generator().manual_seed(self.seed + epoch))
        return self._permutation[within * self.batch_size:(within + 1) * self.batch_size]
