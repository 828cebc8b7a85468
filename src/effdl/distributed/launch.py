"""Process-group start-up and shut-down.

``process_group`` is what every effdl entry point runs under ``torchrun``: it
joins the group ``init_from_env`` describes (RANK/WORLD_SIZE/LOCAL_RANK, NCCL
on CUDA and gloo on CPU, the local GPU pinned) and ends it on every rank
before the interpreter exits. ``spawn`` starts N local CPU processes with gloo
on a free port, for tests and small experiments; real runs use ``torchrun``.
"""

from __future__ import annotations

import importlib
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing import connection as mp_connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from effdl.core.device import resolve_device
from effdl.errors import EffdlError

# torch modules that bind the default group as a default argument (``group=group.WORLD``) when first imported.
# Imported once a group exists (torch._dynamo pulls in the first lazily, e.g. for a meta-device init), they would
# keep it alive past destroy_process_group, and gloo's worker threads with it; so they are imported before.
_BIND_WORLD_ON_IMPORT = ("torch.distributed.nn.functional", "torch.distributed.optim.zero_redundancy_optimizer",
                         "torch.distributed.fsdp.sharded_grad_scaler")


class RankFailure(RuntimeError):
    """A spawned rank raised, died or timed out; the message names the rank and carries its traceback."""


def init_from_env(backend: str | None = None, timeout_s: float = 600) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes; returns (rank, world_size, device).

    Without torchrun's variables this is a single process (rank 0 of 1) and no
    group is created.
    """
    if "RANK" not in os.environ:
        return 0, 1, resolve_device("auto")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise EffdlError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        for module in _BIND_WORLD_ON_IMPORT:
            importlib.import_module(module)
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return rank, world, device


@contextmanager
def process_group(backend: str | None = None, timeout_s: float = 600) -> Iterator[tuple[int, int, torch.device]]:
    """``init_from_env`` for the length of a ``with`` block; yields (rank, world_size, device).

    Leaving the block normally, every rank meets at a barrier, so none tears
    down while a peer is still in its last collective, and then destroys the
    group, which joins gloo's worker threads while the interpreter is alive.
    Left alive until exit, a worker thread may drop its last work item (and
    the tensors it holds) after finalisation has begun: taking the GIL then
    ends the thread inside a C++ destructor and the rank aborts with
    "terminate called without an active exception". Leaving on an exception,
    the group is ``abandon``-ed instead: a peer may be blocked in a collective
    this rank will never join, so a barrier would only wait out the timeout.
    A group that already exists (``spawn``'s, say) belongs to its creator and
    is left alone; without torchrun's variables there is no group at all.
    """
    owner = "RANK" in os.environ and not dist.is_initialized()
    rank, world, device = init_from_env(backend, timeout_s)
    if not owner:
        yield rank, world, device
        return
    try:
        yield rank, world, device
        if dist.is_initialized():  # a failed tensor-parallel step may have abandoned it already
            dist.barrier()
    except BaseException:
        abandon()
        raise
    if dist.is_initialized():
        dist.destroy_process_group()


def abandon(group: dist.ProcessGroup | None = None) -> None:
    """Tear ``group`` (default: every group) down now, without waiting for its peers: the way out after a failure.

    A gloo teardown is local and closes this rank's connections, so a peer
    blocked in a collective with it fails at once instead of waiting out the
    timeout. An NCCL teardown first flushes this rank's queued kernels, which
    can wait forever on a peer that failed too, so an NCCL group is left to
    process exit, after which torchrun stops the other ranks.
    """
    if dist.is_initialized() and dist.get_backend(group) == "gloo":
        dist.destroy_process_group(group)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, backend: str, timeout_s: float, results: Any,
               fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        value = fn(rank, *args)
        results.put((rank, True, value))
    except BaseException as e:
        results.put((rank, False, (_picklable_or_none(e), traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _picklable_or_none(exc: BaseException) -> BaseException | None:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return None
    return exc


def _raise_if_a_rank_died(procs: list[BaseProcess], finished: dict[int, Any]) -> None:
    dead = [r for r, p in enumerate(procs) if r not in finished and p.exitcode not in (None, 0)]
    if dead:
        raise RankFailure(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
          timeout_s: float = 120) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``world_size`` fresh processes joined in one process group.

    Returns each rank's return value in rank order. If a rank raises, the
    others are stopped (they may be blocked in a collective) and its exception
    is re-raised here, chained from a ``RankFailure`` that carries the rank's
    traceback. A rank that dies without reporting, or a run that exceeds
    ``timeout_s``, raises ``RankFailure``.
    ``fn`` and its arguments must be picklable (a module-level function).
    """
    if world_size < 1:
        raise EffdlError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, backend, timeout_s, results, fn, args), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                _raise_if_a_rank_died(procs, values)
                if time.monotonic() > deadline:
                    pending = sorted(set(range(world_size)) - values.keys())
                    raise RankFailure(f"ranks {pending} did not finish within {timeout_s:.0f}s") from None
                continue
            if not ok:
                # a rank that dies breaks its peers' connections: report the death, not a peer's reset
                others = [p.sentinel for r, p in enumerate(procs) if r not in values and r != rank]
                mp_connection.wait(others, timeout=1.0)
                _raise_if_a_rank_died(procs, values)
                exc, remote_traceback = value
                failure = RankFailure(f"rank {rank} raised:\n{remote_traceback}")
                if exc is None:
                    raise failure
                raise exc from failure
            values[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if len(values) == world_size else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(world_size)]
