"""Offload stores: where FPDT keeps the chunks it is not computing on.

Every chunk activation FPDT makes (a layer's input, q, k, v, the attention
output and its log-sum-exp, the dQ accumulators of the backward) is ``put``
into a store under a key as soon as it exists and ``get`` back when a later
step needs it. ``prefetch(key)`` starts bringing a chunk back early, so by the
time the pipeline asks for chunk j+1 it is already resident (double
buffering: the chunk being computed and the one being prefetched).

Three stores share the interface:
    none  keep everything on the compute device (the reference; no saving)
    host  pinned CPU memory, copies on a side CUDA stream; on a CPU device
          the data already lives in host memory, so this equals ``none``
    disk  one spill file per chunk in a private folder, written and read by
          a background thread; on a CPU-only machine this is what lets a
          sequence's activations exceed RAM

Each store counts the bytes it holds in memory (``resident_bytes`` and its
peak) and the bytes it holds elsewhere (``offloaded_bytes``). A stored tensor
must not be modified by the caller afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from collections.abc import Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from effdl.errors import EffdlError

OFFLOAD_KINDS = ("none", "host", "disk")


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class OffloadStore:
    """Key -> tensor storage with prefetch and byte accounting. This base class keeps tensors as given."""

    kind = "none"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tensors: dict[Hashable, Tensor] = {}
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.offloaded_bytes = 0

    def _count(self, resident: int = 0, offloaded: int = 0) -> None:
        with self._lock:
            self.resident_bytes += resident
            self.offloaded_bytes += offloaded
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def put(self, key: Hashable, tensor: Tensor) -> None:
        """Store ``tensor`` under ``key`` (replacing any previous value)."""
        self.discard(key)
        tensor = tensor.detach()
        self._tensors[key] = tensor
        self._count(resident=_nbytes(tensor))

    def get(self, key: Hashable) -> Tensor:
        """The tensor stored under ``key``, on the compute device; the store keeps its copy."""
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"offload store holds no chunk {key!r}") from None

    def prefetch(self, key: Hashable) -> None:
        """Start bringing ``key`` back to the compute device (a no-op where it never left)."""

    def flush(self) -> None:
        """Wait until everything put so far has reached its destination (raises a failed write's error)."""

    def discard(self, key: Hashable) -> None:
        """Forget ``key`` and free what it used; unknown keys are ignored."""
        tensor = self._tensors.pop(key, None)
        if tensor is not None:
            self._count(resident=-_nbytes(tensor))

    def chunk_keys(self) -> list[Hashable]:
        return list(self._tensors)

    def close(self) -> None:
        """Free everything. Safe to call twice."""
        for key in self.chunk_keys():
            self.discard(key)

    @contextmanager
    def close_on_error(self) -> Iterator[None]:
        """Run the block; if it raises, close the store before the error propagates.

        For code whose failure ends the store's use (a training step's forward or backward): a spill folder
        must not wait for the store to be garbage-collected, which a traceback holding the graph delays.
        """
        try:
            yield
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> OffloadStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HostStore(OffloadStore):
    """Chunks of CUDA tensors live in pinned host memory; copies run on a side stream.

    ``put`` starts a device-to-host copy on the side stream and returns at
    once; ``prefetch`` starts the host-to-device copy; ``get`` makes the
    compute stream wait for whichever copy is needed. CPU tensors are kept as
    they are (they are already in host memory).
    """

    kind = "host"

    def __init__(self) -> None:
        super().__init__()
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._host: dict[Hashable, tuple[Tensor, torch.cuda.Event, torch.device]] = {}
        self._on_device: dict[Hashable, tuple[Tensor, torch.cuda.Event]] = {}

    def put(self, key: Hashable, tensor: Tensor) -> None:
        if not tensor.is_cuda:
            super().put(key, tensor)
            return
        self.discard(key)
        tensor = tensor.detach()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self._stream):
            host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self._stream)  # the allocator must not reuse it before the copy ends
            done = torch.cuda.Event()
            done.record(self._stream)
        self._host[key] = (host, done, tensor.device)
        self._count(offloaded=_nbytes(host))

    def prefetch(self, key: Hashable) -> None:
        if key not in self._host or key in self._on_device:
            return
        host, written, device = self._host[key]
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(written)
            tensor = host.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        self._on_device[key] = (tensor, ready)
        self._count(resident=_nbytes(tensor))

    def get(self, key: Hashable) -> Tensor:
        if key not in self._host:
            return super().get(key)
        self.prefetch(key)
        tensor, ready = self._on_device.pop(key)
        torch.cuda.current_stream(tensor.device).wait_event(ready)
        tensor.record_stream(torch.cuda.current_stream(tensor.device))
        self._count(resident=-_nbytes(tensor))
        return tensor

    def discard(self, key: Hashable) -> None:
        super().discard(key)
        prefetched = self._on_device.pop(key, None)
        if prefetched is not None:
            self._count(resident=-_nbytes(prefetched[0]))
        host = self._host.pop(key, None)
        if host is not None:
            self._count(offloaded=-_nbytes(host[0]))

    def chunk_keys(self) -> list[Hashable]:
        return [*self._tensors, *self._host]


class DiskStore(OffloadStore):
    """Chunks spill to files in a private folder; one background thread writes and reads them.

    ``put`` keeps the tensor in memory only until its file is written.
    ``prefetch`` reads a file into memory in the background; ``get`` returns
    the prefetched copy or reads the file. The one worker thread runs writes
    and reads in submission order, so a read never overtakes the write of the
    same chunk. The folder ``<spill_dir>/effdl-fpdt-*`` is removed by
    ``close`` and, should the owner never call it, when the store is
    garbage-collected or the process exits.
    """

    kind = "disk"

    def __init__(self, spill_dir: str | Path | None = None, reserve_bytes: int = 0) -> None:
        super().__init__()
        parent = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="effdl-fpdt-", dir=parent))
        except OSError as e:
            raise EffdlError(f"spill folder {parent} is not writable: {e.strerror or e}") from None
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="effdl-spill")
        self._files: dict[Hashable, tuple[Path, torch.Size, torch.dtype, torch.device]] = {}
        self._writes: dict[Hashable, Future] = {}
        self._reads: dict[Hashable, Future] = {}
        self._next_file = 0
        free = shutil.disk_usage(self.folder).free
        if reserve_bytes > free:
            self.close()
            raise EffdlError(f"spill folder {parent} has {free / 2**20:,.0f} MiB free but this run spills up to "
                             f"{reserve_bytes / 2**20:,.0f} MiB; pass a spill_dir on a larger disk")

    def put(self, key: Hashable, tensor: Tensor) -> None:
        self.discard(key)
        tensor = tensor.detach()
        path = self.folder / f"{self._next_file}.bin"
        self._next_file += 1
        self._files[key] = (path, tensor.shape, tensor.dtype, tensor.device)
        self._tensors[key] = tensor  # resident until written, so a get meanwhile needs no read
        self._count(resident=_nbytes(tensor))
        self._writes[key] = self._worker.submit(self._write, key, tensor, path)

    def _write(self, key: Hashable, tensor: Tensor, path: Path) -> None:
        raw = tensor.contiguous().cpu().view(-1).view(torch.uint8)  # any dtype, bf16 included
        try:
            with open(path, "wb") as f:
                f.write(memoryview(raw.numpy()))
        except OSError as e:
            path.unlink(missing_ok=True)  # a partial file is not offloaded data: discard must not uncount it
            raise EffdlError(f"could not write spill file {path}: {e.strerror or e} (is the disk full?)") from None
        self._count(offloaded=_nbytes(tensor))
        if self._tensors.get(key) is tensor:  # not replaced or discarded meanwhile
            self._tensors.pop(key)
            self._count(resident=-_nbytes(tensor))

    def _read(self, key: Hashable) -> Tensor:
        path, shape, dtype, device = self._files[key]
        raw = torch.empty(shape.numel() * dtype.itemsize, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.readinto(memoryview(raw.numpy()))
        tensor = raw.view(dtype).view(shape).to(device)
        self._count(resident=_nbytes(tensor))
        return tensor

    def prefetch(self, key: Hashable) -> None:
        if key in self._files and key not in self._reads and key not in self._tensors:
            self._reads[key] = self._worker.submit(self._read, key)

    def get(self, key: Hashable) -> Tensor:
        if key not in self._files:
            return super().get(key)
        write = self._writes.get(key)
        if write is not None and write.done():
            del self._writes[key]
            write.result()  # raises if the write failed
        tensor = self._tensors.get(key)
        if tensor is not None:  # still being written, or the write just failed and raised above
            return tensor
        read = self._reads.pop(key, None)
        tensor = read.result() if read is not None else self._read(key)
        self._count(resident=-_nbytes(tensor))  # handed over: the caller owns it now
        return tensor

    def flush(self) -> None:
        for key in list(self._writes):
            self._writes.pop(key).result()  # raises once for a failed write; the tensor stays resident

    def discard(self, key: Hashable) -> None:
        write, read = self._writes.pop(key, None), self._reads.pop(key, None)
        if write is not None:
            write.exception()  # wait; a failed write of data no longer wanted is not an error
        if read is not None:
            self._count(resident=-_nbytes(read.result()))
        super().discard(key)
        entry = self._files.pop(key, None)
        if entry is not None:
            path, shape, dtype, _ = entry
            if path.exists():
                self._count(offloaded=-shape.numel() * dtype.itemsize)
                path.unlink()

    def chunk_keys(self) -> list[Hashable]:
        return list(self._files)

    def close(self) -> None:
        if not self._cleanup.alive:
            return
        try:
            for future in [*self._writes.values(), *self._reads.values()]:
                future.cancel()
            self._worker.shutdown(wait=True)
        finally:
            self._writes.clear()
            self._reads.clear()
            self._files.clear()
            self._tensors.clear()
            self.resident_bytes = self.offloaded_bytes = 0
            self._cleanup()


def make_store(kind: str, spill_dir: str | Path | None = None, reserve_bytes: int = 0) -> OffloadStore:
    """The store named ``kind`` ("none" | "host" | "disk").

    ``reserve_bytes`` is checked against the spill disk's free space before anything is written.
    """
    if kind == "none":
        return OffloadStore()
    if kind == "host":
        return HostStore()
    if kind == "disk":
        return DiskStore(spill_dir, reserve_bytes)
    raise EffdlError(f"unknown offload {kind!r}; choose one of {', '.join(OFFLOAD_KINDS)}")
