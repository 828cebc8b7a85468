"""torch.distributed helpers: start from torchrun's environment, and spawn CPU ranks for tests."""

from effdl.dist.launch import RankFailure, init_from_env, spawn

__all__ = ["RankFailure", "init_from_env", "spawn"]
