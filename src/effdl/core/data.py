"""Embedded datasets that need no download.

Text: the Python standard library's own ``.py`` files (~30 MB on CPython
3.11), in sorted path order, split into train/val by a hash of each file's
path, joined into one token stream with the tokenizer's eos id between files.

Images: Fashion-MNIST through torchvision's own loader, fed from the Debian
package ``dataset-fashion-mnist`` when it is installed (never downloaded), and
``shapes10``, ten classes of 28x28 grayscale shapes and textures generated
here from a seed, for machines that have only what pip installed.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import shutil
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from effdl.core.tokenizer import ByteTokenizer, Tokenizer
from effdl.errors import EffdlError
from effdl.timing import torch_threads

Split = Literal["train", "val"]
VAL_PERCENT = 3  # share of files held out for validation, chosen by path hash
FASHION_MNIST_DEB_DIR = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    """Where effdl keeps derived files (``$EFFDL_CACHE``, default ``~/.cache/effdl``)."""
    return Path(os.environ.get("EFFDL_CACHE", Path.home() / ".cache" / "effdl"))


# --------------------------------------------------------------------------- text corpus


def stdlib_files(split: Split) -> list[Path]:
    """The standard library's ``.py`` files of one split, in sorted relative-path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if {"site-packages", "dist-packages"} & set(rel.parts):
            continue
        held_out = zlib.crc32(rel.as_posix().encode()) % 100 < VAL_PERCENT
        if held_out == (split == "val"):
            files.append(path)
    if not files:
        raise EffdlError(f"found no Python standard library sources under {root}")
    return files


@functools.lru_cache(maxsize=4)
def corpus_tokens(split: Split = "train", tokenizer: Tokenizer | None = None) -> Tensor:
    """The whole split as one 1-D token tensor, files separated by the eos id.

    The byte tokenizer (default) reads raw file bytes; any other tokenizer
    encodes each file's text. Tokens are stored as int16/int32 to save memory.
    """
    if split not in ("train", "val"):
        raise EffdlError(f"split must be 'train' or 'val', got {split!r}")
    tokenizer = tokenizer or ByteTokenizer()
    sep = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    dtype = np.int16 if tokenizer.vocab_size <= 2**15 else np.int32
    pieces = []
    for path in stdlib_files(split):
        if isinstance(tokenizer, ByteTokenizer):
            ids = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(dtype)
        else:
            ids = np.asarray(tokenizer.encode(path.read_text(errors="replace")), dtype=dtype)
        pieces += [ids, np.array([sep], dtype=dtype)]
    return torch.from_numpy(np.concatenate(pieces))


class TokenBatches:
    """Batches of (inputs, targets), each (batch_size, seq_len), cut from a token stream.

    Training batches are random windows, and batch ``step`` is a pure function
    of ``(seed, step)``: a run resumed at step n sees exactly the batches an
    uninterrupted run would. ``fixed(n)`` gives n evenly spaced, always
    identical batches for evaluation.
    """

    def __init__(self, tokens: Tensor, batch_size: int, seq_len: int, seed: int = 0):
        if seq_len <= 0 or batch_size <= 0:
            raise EffdlError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if tokens.numel() < seq_len + 1:
            raise EffdlError(f"seq_len {seq_len} needs {seq_len + 1} tokens but the stream has {tokens.numel()}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def _windows(self, starts: Tensor) -> tuple[Tensor, Tensor]:
        offsets = torch.arange(self.seq_len + 1)  # (T+1,)
        window = self.tokens[starts[:, None] + offsets].long()  # (B, T+1)
        return window[:, :-1], window[:, 1:]

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        high = self.tokens.numel() - self.seq_len - 1
        return self._windows(torch.randint(0, high + 1, (self.batch_size,), generator=generator))

    def fixed(self, n_batches: int) -> list[tuple[Tensor, Tensor]]:
        high = self.tokens.numel() - self.seq_len - 1
        starts = torch.linspace(0, high, n_batches * self.batch_size).long()
        return [self._windows(chunk) for chunk in starts.split(self.batch_size)]


# --------------------------------------------------------------------------- image sets

FASHION_MNIST, SHAPES10 = "fashion-mnist", "shapes10"
IMAGE_SETS = (FASHION_MNIST, SHAPES10)
_FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                  "t10k-labels-idx1-ubyte")
SHAPES10_CLASSES = ("disc", "ring", "square", "frame", "triangle", "cross", "bar", "stripes", "checker", "dots")
SHAPES10_SPLITS = {True: (60_000, 0), False: (10_000, 1)}  # train/test: (images, seed), sized as Fashion-MNIST
# Pixel mean and std of each set's training split, in [0, 1]: what the trainers normalise inputs with.
IMAGE_STATS = {FASHION_MNIST: (0.2860, 0.3530), SHAPES10: (0.2486, 0.2363)}
_SHAPES10_CHUNK = 1000  # images per seeded chunk, so the first n images are the same whatever the size asked


@dataclass(frozen=True)
class ImageSet:
    """One split of a 10-class 28x28 grayscale image set."""

    name: str
    images: Tensor  # (N, 28, 28) uint8
    labels: Tensor  # (N,) int64 in [0, 10)
    classes: tuple[str, ...]

    @property
    def mean_std(self) -> tuple[float, float]:
        return IMAGE_STATS[self.name]


def _fashion_root(root: str | Path | None) -> Path:
    return Path(root) if root is not None else cache_dir() / "datasets"


def fashion_mnist_installed(root: str | Path | None = None) -> bool:
    """Whether ``fashion_mnist`` can load without a download: the Debian package or the four files in ``root``."""
    raw = _fashion_root(root) / "FashionMNIST" / "raw"
    return FASHION_MNIST_DEB_DIR.is_dir() or all((raw / name).is_file() for name in _FASHION_FILES)


def default_image_set() -> str:
    """Fashion-MNIST where it is installed, else the generated ``shapes10``: the set that needs nothing else."""
    return FASHION_MNIST if fashion_mnist_installed() else SHAPES10


def load_images(name: str, train: bool, limit: int = 0) -> ImageSet:
    """The train or test split of image set ``name`` ("fashion-mnist" | "shapes10"), its first ``limit`` images
    (0 = all)."""
    if name == FASHION_MNIST:
        ds = fashion_mnist(train=train)
        images, labels = (ds.data[:limit], ds.targets[:limit]) if limit else (ds.data, ds.targets)
        return ImageSet(name, images, labels, tuple(ds.classes))
    if name == SHAPES10:
        size, seed = SHAPES10_SPLITS[train]
        return ImageSet(name, *shapes10(min(limit, size) if limit else size, seed), SHAPES10_CLASSES)
    raise EffdlError(f"unknown image set {name!r}; available: {', '.join(IMAGE_SETS)}")


def fashion_mnist(train: bool = True, transform=None, root: str | Path | None = None):
    """Fashion-MNIST as a ``torchvision.datasets.FashionMNIST``, read from the Debian package
    ``dataset-fashion-mnist`` or from files already in ``root``; never downloaded."""
    from torchvision.datasets import FashionMNIST

    root = _fashion_root(root)
    raw = root / "FashionMNIST" / "raw"
    if FASHION_MNIST_DEB_DIR.is_dir():
        raw.mkdir(parents=True, exist_ok=True)
        for gz in FASHION_MNIST_DEB_DIR.glob("*-ubyte.gz"):
            target = raw / gz.name.removesuffix(".gz")
            if not target.is_file():
                with gzip.open(gz, "rb") as src, open(target.with_suffix(".tmp"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
                target.with_suffix(".tmp").rename(target)
    if not fashion_mnist_installed(root):
        raise EffdlError(
            "Fashion-MNIST is not available: install it with `sudo apt-get install dataset-fashion-mnist` "
            f"(Debian/Ubuntu), or put its four *-ubyte files in {raw}; or use `--data {SHAPES10}`, which is "
            "generated here and needs nothing installed"
        )
    try:
        return FashionMNIST(str(root), train=train, transform=transform, download=False)
    except (RuntimeError, OSError) as e:
        raise EffdlError(f"cannot read Fashion-MNIST from {raw}: {e}") from None


def shapes10(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` generated 28x28 grayscale images of ten classes (``SHAPES10_CLASSES``), uint8 (n, 28, 28), and their
    int64 labels; a pure function of ``(n, seed)``, about 30 us an image on one core.

    Each image is one shape or textured disc of random size (radius 6-11 px), rotation, position (up to 4 px off
    centre), stroke width and stripe period, with random foreground and background grey levels and Gaussian
    noise (std 0.03-0.12): small, noisy squares, discs and triangles, or stripes and checkers, are easy to confuse,
    so a small model learns it well but not perfectly. Images are made in seeded chunks of 1,000 with balanced
    classes, so the first m of n images do not depend on n.
    """
    if n <= 0:
        raise EffdlError(f"the number of images must be positive, got {n}")
    with torch_threads(1):  # each op touches ~100 small images: too little work to share between threads
        chunks = [_shapes10_chunk(torch.Generator().manual_seed(seed * 1_000_003 + c))
                  for c in range(math.ceil(n / _SHAPES10_CHUNK))]
    images, labels = torch.cat([x for x, _ in chunks]), torch.cat([y for _, y in chunks])
    return images[:n], labels[:n]


def _shapes10_chunk(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    n, side = _SHAPES10_CHUNK, 28
    labels = (torch.arange(n) % len(SHAPES10_CLASSES))[torch.randperm(n, generator=generator)]
    params = torch.rand(n, 9, generator=generator)
    noise = torch.randn(n, side, side, generator=generator)
    coords = torch.arange(side, dtype=torch.float32)
    coverage = torch.empty(n, side, side)
    for k in range(len(SHAPES10_CLASSES)):
        index = (labels == k).nonzero()[:, 0]
        p = params[index][:, :, None, None]  # (m, 9, 1, 1)
        radius, width, angle = 6 + 5 * p[:, 0], 1.5 + 1.5 * p[:, 1], 2 * math.pi * p[:, 2]
        dx = coords - (13.5 + 8 * (p[:, 3] - 0.5))  # (m, 1, 28): x from the shape's centre
        dy = coords[:, None] - (13.5 + 8 * (p[:, 4] - 0.5))  # (m, 28, 1)
        a, b = angle.cos() * dx + angle.sin() * dy, angle.cos() * dy - angle.sin() * dx  # (m, 28, 28) rotated
        # A signed distance in pixels, clipped to [0, 1] half a pixel either side of the edge: anti-aliasing.
        coverage[index] = (0.5 - _shape_distance(k, a, b, radius, width, 3 + 2 * p[:, 5])).clamp_(0, 1)
    p = params[:, 6:, None, None]
    background, foreground, sigma = 0.3 * p[:, 0], 0.55 + 0.45 * p[:, 1], 0.03 + 0.09 * p[:, 2]
    images = coverage.mul_(foreground - background).add_(background).add_(noise.mul_(sigma))
    return images.clamp_(0, 1).mul_(255).round_().to(torch.uint8), labels


def _shape_distance(k: int, a: Tensor, b: Tensor, radius: Tensor, width: Tensor, period: Tensor) -> Tensor:
    """Signed distance (px, negative inside) of class ``k``'s shape at rotated coordinates ``(a, b)``."""
    name = SHAPES10_CLASSES[k]
    rho = torch.hypot(a, b)
    box = torch.maximum(a.abs(), b.abs())

    def arm(along: Tensor, across: Tensor) -> Tensor:
        return torch.maximum(across.abs() - width / 2, along.abs() - radius)

    if name == "disc":
        return rho - radius
    if name == "ring":
        return (rho - radius).abs() - width / 2
    if name == "square":
        return box - 0.8 * radius
    if name == "frame":
        return (box - 0.8 * radius).abs() - width / 2
    if name == "triangle":  # equilateral: the largest of three half-plane distances, inradius radius / 2
        sides = [a * math.cos(t) + b * math.sin(t) for t in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
        return torch.stack(sides).amax(0) - 0.5 * radius
    if name == "cross":
        return torch.minimum(arm(a, b), arm(b, a))
    if name == "bar":
        return arm(a, b)
    wave_a, wave_b = torch.sin(2 * math.pi * a / period), torch.sin(2 * math.pi * b / period)
    if name == "stripes":  # a disc filled with stripes, not a disc: the max of both distances
        return torch.maximum(rho - radius, -wave_a * period / 4)
    if name == "checker":
        return torch.maximum(rho - radius, -wave_a * wave_b * period / 2)
    corners = [torch.hypot(a - sa * radius / 2, b - sb * radius / 2) for sa in (-1, 1) for sb in (-1, 1)]
    return torch.stack(corners).amin(0) - 0.3 * radius  # dots: four discs at a square's corners
