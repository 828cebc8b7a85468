"""torch.distributed helpers: run a ``torchrun`` rank from start to a clean end, and spawn CPU ranks for tests."""

from effdl.distributed.launch import RankFailure, abandon, init_from_env, process_group, spawn

__all__ = ["RankFailure", "abandon", "init_from_env", "process_group", "spawn"]
