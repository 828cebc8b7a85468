import pytest
import torch

from effdl.core.data import TokenBatches, corpus_tokens, fashion_mnist, stdlib_files
from effdl.errors import EffdlError


def test_corpus_is_large_deterministic_and_split():
    train_files, val_files = stdlib_files("train"), stdlib_files("val")
    assert not set(train_files) & set(val_files)
    assert len(val_files) > 10
    train = corpus_tokens("train")
    assert train.numel() >= 10_000_000
    assert int(train.max()) <= 257 and int(train.min()) >= 0
    # Files are joined with the eos separator, in sorted order.
    first = train_files[0].read_bytes()
    assert train[: len(first)].tolist() == list(first)
    assert int(train[len(first)]) == 257
    assert stdlib_files("train") == train_files


def test_batches_are_a_function_of_step():
    tokens = corpus_tokens("val")
    a = TokenBatches(tokens, batch_size=4, seq_len=100, seed=1)
    b = TokenBatches(tokens, batch_size=4, seq_len=100, seed=1)
    x, y = a.batch(7)
    assert x.shape == y.shape == (4, 100) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    assert torch.equal(x, b.batch(7)[0])
    assert not torch.equal(x, a.batch(8)[0])
    fixed = a.fixed(3)
    assert len(fixed) == 3 and all(torch.equal(f[0], g[0]) for f, g in zip(fixed, b.fixed(3), strict=True))


def test_any_sequence_length_and_errors():
    tokens = corpus_tokens("val")
    assert TokenBatches(tokens, 1, 65_536).batch(0)[0].shape == (1, 65_536)
    with pytest.raises(EffdlError, match="needs"):
        TokenBatches(tokens[:10], 1, 64)
    with pytest.raises(EffdlError, match="split must be"):
        corpus_tokens("test")


def test_fashion_mnist_from_debian_package(tmp_path):
    train = fashion_mnist(train=True, root=tmp_path)
    test = fashion_mnist(train=False, root=tmp_path)
    assert (len(train), len(test)) == (60_000, 10_000)
    image, label = train[0]
    assert image.size == (28, 28) and 0 <= label < 10
