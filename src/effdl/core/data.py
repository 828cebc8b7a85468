"""Embedded datasets that need no download.

Text: the Python standard library's own ``.py`` files (~30 MB on CPython
3.11), in sorted path order, split into train/val by a hash of each file's
path, joined into one token stream with the tokenizer's eos id between files.

Images: Fashion-MNIST through torchvision's own loader, fed from the Debian
package ``dataset-fashion-mnist`` when it is installed.
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import sysconfig
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from effdl.core.tokenizer import ByteTokenizer, Tokenizer
from effdl.errors import EffdlError

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


# --------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist(train: bool = True, transform=None, root: str | Path | None = None):
    """Fashion-MNIST as a ``torchvision.datasets.FashionMNIST``, with no download when the
    Debian package ``dataset-fashion-mnist`` is installed."""
    from torchvision.datasets import FashionMNIST

    root = Path(root) if root is not None else cache_dir() / "datasets"
    raw = root / "FashionMNIST" / "raw"
    if FASHION_MNIST_DEB_DIR.is_dir():
        raw.mkdir(parents=True, exist_ok=True)
        for gz in FASHION_MNIST_DEB_DIR.glob("*-ubyte.gz"):
            target = raw / gz.name.removesuffix(".gz")
            if not target.is_file():
                with gzip.open(gz, "rb") as src, open(target.with_suffix(".tmp"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
                target.with_suffix(".tmp").rename(target)
    try:
        return FashionMNIST(str(root), train=train, transform=transform, download=not FASHION_MNIST_DEB_DIR.is_dir())
    except (RuntimeError, OSError) as e:
        raise EffdlError(
            "Fashion-MNIST is not available: install it with `sudo apt-get install dataset-fashion-mnist` "
            f"(Debian/Ubuntu), or put the four *-ubyte files in {raw} ({e})"
        ) from None
