"""Decode attention over each row's live keys only: a small C++ kernel for fp32 on CPU, built on first use.

A decode step's rows have different lengths, but masked SDPA over the batch
reads every row's keys and values up to the longest one. On CPU that read is
the cost: at 32 rows of the ``flover_vs_vllm`` workload it was a third of the
step, and about half of what it read was padding. vLLM's CPU backend reads
only the blocks a sequence holds; this kernel does the same for the slot
cache (``csrc/decode_attention.cpp``).

The kernel is compiled with ``torch.utils.cpp_extension`` the first time a
process asks for it (about 30 s on 2 cores; cached in ``TORCH_EXTENSIONS_DIR``
after that), as DeepSpeed builds its ops. Where it cannot be built (no C++
compiler, no OpenMP), ``load_decode_kernel`` says why once and returns None,
and the runner keeps masked SDPA.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import warnings
from pathlib import Path

import torch
from torch import Tensor

from effdl.progress import console

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"


def decode_kernel_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel covers tensors of this device and dtype (fp32 on CPU)."""
    return device.type == "cpu" and dtype == torch.float32


@functools.cache
def load_decode_kernel() -> object | None:
    """The compiled kernel module, or None (with one warning saying why) where it cannot be built here."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime": not needed here
    try:
        from torch.utils.cpp_extension import load

        with console.status("building Flover's decode-attention kernel (once per machine, about 30 s)"):
            return load(name=f"effdl_decode_attention_{_cpu_tag()}", sources=[str(SOURCE)],
                        extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as error:  # a missing compiler, headers or OpenMP: serve with masked SDPA instead
        warnings.warn(f"Flover's decode-attention kernel could not be built ({type(error).__name__}: "
                      f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); decode steps use "
                      "masked SDPA over the longest row instead", RuntimeWarning, stacklevel=2)
        return None


def _cpu_tag() -> str:
    """A short hash of this CPU's instruction-set flags: a build for one CPU (``-march=native``) is never loaded on
    another that shares the extensions cache (a home directory on NFS, say)."""
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "") \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


def decode_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, window: int | None = None,
                     new_k: Tensor | None = None, new_v: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v per row over that row's keys 0..lengths[b]-1 (the last ``window`` of them).

    q (B, H, Dh); k, v (B, K, S, Dh), H a multiple of K (grouped-query
    attention); lengths (B,) int64 in [1, S]. Returns (B, H, Dh). Cost:
    O(sum(lengths) * H * Dh) time, reading each row's live keys and values
    once, where masked SDPA reads B * max(lengths) of them.

    ``new_k``, ``new_v`` (B, K, Dh): each row's newest key and value, first
    written into ``k`` and ``v`` (in place) at position lengths[b] - 1, so the
    caller needs no scatter of its own into the cache (see the kernel's source
    for why that is faster).
    """
    kernel = load_decode_kernel()
    if kernel is None:
        raise RuntimeError("Flover's decode-attention kernel is not available on this machine")
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (B, H, Dh) and k, v (B, K, S, Dh) of one shape; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    (B, H, Dh), (_, K, S, _) = q.shape, k.shape
    if k.shape[0] != B or k.shape[3] != Dh or H % K:
        raise ValueError(f"q {tuple(q.shape)} does not fit k, v {tuple(k.shape)}: need the same B and Dh, and H a "
                         "multiple of K")
    if not all(decode_kernel_supported(t.device, t.dtype) for t in (q, k, v)) or k.stride(3) != 1 \
            or v.stride(3) != 1:
        raise ValueError("the decode kernel takes fp32 CPU tensors with a unit stride in Dh")
    if lengths.shape != (B,) or lengths.dtype != torch.long:
        raise ValueError(f"lengths must be int64 of shape ({B},); got {lengths.dtype} {tuple(lengths.shape)}")
    if B and not 1 <= int(lengths.min()) <= int(lengths.max()) <= S:
        raise ValueError(f"lengths must lie in [1, {S}]; got {lengths.tolist()}")
    if (new_k is None) != (new_v is None):
        raise ValueError("new_k and new_v go together: give both or neither")
    if new_k is not None:
        if new_k.shape != (B, K, Dh) or new_v.shape != (B, K, Dh):
            raise ValueError(f"new_k and new_v must be (B, K, Dh) = {(B, K, Dh)}; got {tuple(new_k.shape)} and "
                             f"{tuple(new_v.shape)}")
        if not all(decode_kernel_supported(t.device, t.dtype) for t in (new_k, new_v)):
            raise ValueError("the decode kernel takes fp32 CPU tensors for new_k and new_v")
        new_k, new_v = new_k.contiguous(), new_v.contiguous()
    with torch.profiler.record_function("effdl::decode_attention"):  # named in profiles like the ops around it
        return kernel.decode_attention(q.contiguous(), k, v, lengths.contiguous(), window or 0, Dh ** -0.5,
                                       new_k, new_v)
