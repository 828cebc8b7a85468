"""FPDT: fully pipelined distributed transformer training on very long sequences."""

from effdl.fpdt.attention import chunked_attention
from effdl.fpdt.pipeline import FPDTConfig, fpdt_loss
from effdl.fpdt.store import DiskStore, HostStore, OffloadStore, make_store

__all__ = ["DiskStore", "FPDTConfig", "HostStore", "OffloadStore", "chunked_attention", "fpdt_loss", "make_store"]
