"""Timing that holds up on a busy machine: interleaved repeats, medians and quartiles, and ratios that say when
two timings cannot be told apart."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

# Fewer ticks of perf_counter than this in a median and the clock's granularity is part of the figure.
MIN_TICKS = 1000


@dataclass
class Timing:
    median_s: float
    p25_s: float
    p75_s: float
    samples: list[float]

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.p75_s - self.p25_s) / self.median_s


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int = 2, repeat: int = 7) -> dict[str, Timing]:
    """Time several callables side by side: after ``warmup`` untimed rounds, ``repeat`` rounds that each
    run every callable once, so drifts in machine speed (frequency, other load) hit all of them alike.
    Wall clock, CUDA synchronised."""

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: _timing(s) for name, s in samples.items()}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads. On a CPU that other processes share, every parallel op waits
    for all its threads to be scheduled, which made small-op work (a 49 x 49 Newton iteration, 100-image
    tensors) 10-50x slower with 2 threads than with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timing(samples: list[float]) -> Timing:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return Timing(statistics.median(samples), q[0], q[2], samples)


def speedup(slow: Timing, fast: Timing) -> float | None:
    """How many times faster ``fast`` ran than ``slow`` (ratio of medians; below 1 where it was slower), or
    None where the two cannot be told apart: their interquartile ranges overlap, or a median is too few clock
    ticks to mean anything."""
    tick = time.get_clock_info("perf_counter").resolution
    if min(slow.median_s, fast.median_s) < MIN_TICKS * tick:
        return None
    if fast.p75_s >= slow.p25_s and slow.p75_s >= fast.p25_s:
        return None
    return slow.median_s / fast.median_s


def describe_speedup(x: float | None, fast: str, slow: str) -> str:
    """``speedup(slow, fast)`` in words: "A 3.2x faster than B", "A 1.5x slower than B" or "A and B too close to
    tell apart"."""
    if x is None:
        return f"{fast} and {slow} too close to tell apart"
    return f"{fast} {x:.1f}x faster than {slow}" if x >= 1 else f"{fast} {1 / x:.1f}x slower than {slow}"
