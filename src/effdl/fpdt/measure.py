"""Measuring what a training step costs: peak resident memory above a baseline, time, tokens/s.

Peak RSS is the kernel's high-water mark (VmHWM), reset before the step by
writing 5 to /proc/self/clear_refs. Pages of the disk store's spill files sit
in the page cache, not in the process, and do not count; that is the point of
spilling. A peak above the pre-step RSS depends on what the process freed
before (freed heap pages are reused without raising RSS), so a figure to
compare comes from ``measure_step_fresh``: one step in a new process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from effdl.core.config import ModelConfig
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError
from effdl.fpdt.baselines import checkpointed_loss, plain_loss, ulysses_loss
from effdl.fpdt.pipeline import FPDTConfig, fpdt_loss
from effdl.fpdt.plan import PLAN_METHODS

MiB = 2**20


def release_large_frees(threshold_bytes: int = MiB) -> bool:
    """Serve allocations of ``threshold_bytes`` or more by mmap, so freeing them returns memory to the OS at once.

    glibc raises its mmap threshold as large blocks are freed (up to 32 MiB)
    and then serves chunk-sized tensors from its heap, where freed space
    fragments and RSS creeps up with the sequence length although live
    tensors do not. Fixing the threshold keeps RSS equal to what is live, for
    every training method alike. Returns False where glibc is not the
    allocator (nothing is changed).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise EffdlError(f"/proc/self/status has no {field}; peak-memory measurement needs Linux")


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    """Make the high-water mark start again from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """Highest RSS since the last ``reset_peak_rss`` (or the process start)."""
    return _status_kib("VmHWM") * 1024


def gemm_flops(size: int = 2048, device: torch.device | str = "cpu", repeat: int = 5) -> float:
    """FLOP/s of a large fp32 (CPU) or bf16 (CUDA) matmul here: the denominator of MFU."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeat):
        if a.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token: 6 per non-embedding parameter plus causal attention (6 L D S / 2 x 2)."""
    return 6 * cfg.num_params(include_embeddings=False) + 6 * cfg.n_layers * cfg.dim * seq_len


@dataclass
class StepMeasure:
    method: str
    seq_len: int
    peak_bytes: int  # peak RSS above the RSS just before the step (max over ranks)
    step_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.seq_len / self.step_s


def loss_fn_for(method: str, fpdt: FPDTConfig | None = None,
                group: dist.ProcessGroup | None = None) -> Callable[[Transformer, Tensor, Tensor], Tensor]:
    """The loss function that trains with ``method`` ("plain" | "checkpoint" | "ulysses" | "fpdt")."""
    if method == "plain":
        return plain_loss
    if method == "checkpoint":
        return checkpointed_loss
    if method == "ulysses":
        return lambda model, x, y: ulysses_loss(model, x, y, group)
    if method == "fpdt":
        cfg = fpdt or FPDTConfig()
        return lambda model, x, y: fpdt_loss(model, x, y, cfg, group)
    raise EffdlError(f"unknown method {method!r}; choose one of {', '.join(PLAN_METHODS)}")


def measure_step(model: Transformer, optimizer: torch.optim.Optimizer, loss_fn: Callable, seq_len: int,
                 method: str = "", batch: int = 1, group: dist.ProcessGroup | None = None) -> StepMeasure:
    """One optimizer step on random tokens of ``seq_len``: peak RSS above the pre-step RSS, and wall time."""
    gen = torch.Generator().manual_seed(seq_len)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)
    baseline = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    loss = loss_fn(model, tokens[:, :-1], tokens[:, 1:])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    elapsed = time.perf_counter() - start
    peak = torch.tensor([peak_rss_bytes() - baseline, elapsed], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return StepMeasure(method, seq_len, int(peak[0]), float(peak[1]))


def warmed_model(cfg: ModelConfig, loss_fn: Callable, warm_len: int = 256,
                 seed: int = 0) -> tuple[Transformer, torch.optim.Optimizer]:
    """A model and AdamW whose state and kernels exist already (one short step), so a step measures activations."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    measure_step(model, optimizer, loss_fn, warm_len)
    return model, optimizer


def measure_step_fresh(method: str, cfg: ModelConfig, seq_len: int, fpdt: FPDTConfig | None = None,
                       ranks: int = 1, warm_len: int = 256, timeout_s: float = 600.0) -> StepMeasure:
    """``measure_step`` of ``method`` after a warm-up step, in a fresh process (``ranks`` of them under torchrun
    when > 1) that fixes glibc's mmap threshold first: a peak that owes nothing to what ran before it here."""
    spec = {"method": method, "model": dataclasses.asdict(cfg), "seq_len": seq_len, "warm_len": warm_len,
            "fpdt": dataclasses.asdict(fpdt) if fpdt is not None else None}
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={ranks}"]
    cmd = [*launcher, "-m", "effdl.fpdt.measure", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise EffdlError(f"measuring {method} at {seq_len:,} tokens took over {timeout_s:.0f} s") from None
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise EffdlError(f"measuring {method} at {seq_len:,} tokens failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    return StepMeasure(**json.loads(lines[-1]))


def _measure_child(spec: dict) -> None:
    """The process ``measure_step_fresh`` starts (each torchrun rank): one measurement, a JSON line on rank 0."""
    from effdl.distributed import process_group

    release_large_frees()
    with process_group("gloo") as (rank, world, _):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        fpdt = FPDTConfig(**spec["fpdt"]) if spec["fpdt"] is not None else None
        loss_fn = loss_fn_for(spec["method"], fpdt)
        model, optimizer = warmed_model(ModelConfig(**spec["model"]), loss_fn, warm_len=spec["warm_len"])
        result = measure_step(model, optimizer, loss_fn, spec["seq_len"], spec["method"])
        if rank == 0:
            print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    _measure_child(json.loads(sys.argv[1]))
