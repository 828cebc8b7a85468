"""FPDT: fully pipelined distributed transformer training on very long sequences."""

from effdl.fpdt.attention import chunked_attention
from effdl.fpdt.store import DiskStore, HostStore, OffloadStore, make_store

__all__ = ["DiskStore", "HostStore", "OffloadStore", "chunked_attention", "make_store"]
