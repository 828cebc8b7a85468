"""Offload stores: exact round trips, prefetch ordering, byte accounting, spill-folder cleanup."""

import gc

import pytest
import torch

from effdl.errors import EffdlError
from effdl.fpdt import make_store
from effdl.fpdt.store import DiskStore

KINDS = ["none", "host", "disk"]


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        ("a", 0): torch.randn(3, 5, generator=gen),
        ("a", 1): torch.randn(2, 4, 7, generator=gen).to(torch.bfloat16),  # not numpy-representable
        ("b", 0): torch.randint(-100, 100, (11,), generator=gen),
        ("b", 1): torch.randn(4, 6, generator=gen).t(),  # non-contiguous
    }


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_exact(kind, tmp_path):
    with make_store(kind, tmp_path) as store:
        data = _tensors()
        for key, t in data.items():
            store.put(key, t)
        store.prefetch(("a", 1))
        for key, t in data.items():
            got = store.get(key)
            assert got.dtype == t.dtype and torch.equal(got, t)
        assert sorted(store.chunk_keys()) == sorted(data)


def test_disk_prefetch_after_put_and_replacement(tmp_path):
    """A prefetch queued right after a put reads what was written; a replaced key returns the new value."""
    with DiskStore(tmp_path) as store:
        for i in range(20):
            store.put(("k", i), torch.full((1000,), float(i)))
            store.prefetch(("k", i))
        store.put(("k", 3), torch.full((10,), -1.0))
        store.prefetch(("k", 3))
        for i in range(20):
            assert torch.equal(store.get(("k", i)), torch.full((10,), -1.0) if i == 3 else torch.full((1000,), i))


def test_disk_accounting_and_cleanup_after_success(tmp_path):
    store = DiskStore(tmp_path)
    tensors = [torch.zeros(1024) for _ in range(4)]  # 4 KiB each
    for i, t in enumerate(tensors):
        store.put(i, t)
    store.flush()
    assert store.offloaded_bytes == 4 * 4096 and store.resident_bytes == 0
    assert 0 < store.peak_resident_bytes <= 4 * 4096
    assert len(list(store.folder.iterdir())) == 4
    store.discard(1)
    assert store.offloaded_bytes == 3 * 4096 and len(list(store.folder.iterdir())) == 3
    folder = store.folder
    store.close()
    store.close()
    assert not folder.exists() and list(tmp_path.iterdir()) == []


def test_disk_folder_removed_when_store_is_dropped_unclosed(tmp_path):
    store = DiskStore(tmp_path)
    store.put("x", torch.ones(100))
    store.flush()  # a queued write holds the store until it has run
    del store
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_unwritable_and_full_spill_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(EffdlError, match="not writable"):
        DiskStore(blocker / "spill")
    with pytest.raises(EffdlError, match="MiB free"):
        DiskStore(tmp_path, reserve_bytes=1 << 60)
    assert list(tmp_path.iterdir()) == [blocker]


def test_none_store_accounting():
    store = make_store("none")
    store.put(1, torch.zeros(256))
    store.put(2, torch.zeros(256))
    store.discard(1)
    assert store.resident_bytes == 1024 and store.peak_resident_bytes == 2048 and store.offloaded_bytes == 0
    with pytest.raises(EffdlError, match="unknown offload"):
        make_store("nvme")


def test_disk_failed_write_leaves_no_file_and_exact_accounting(tmp_path, monkeypatch):
    import errno

    import effdl.fpdt.store as store_module

    class FullDisk:
        """A file that takes a few bytes and then reports a full disk, as a real one would."""

        def __init__(self, path, mode):
            self.file = open(path, mode)  # noqa: SIM115

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(bytes(data)[:16])
            raise OSError(errno.ENOSPC, "No space left on device")

    store = DiskStore(tmp_path)
    monkeypatch.setattr(store_module, "open", FullDisk, raising=False)
    expected = torch.randn(64, 64)
    store.put("x", expected.clone())
    with pytest.raises(EffdlError, match="could not write spill file .* No space left on device"):
        store.flush()
    assert not list(store.folder.glob("*.bin"))
    assert torch.equal(store.get("x"), expected)  # nothing lost: the tensor stayed resident
    store.put("y", torch.randn(8))  # a second failed write, discarded before anyone asked for it
    store.discard("y")
    store.discard("x")
    assert store.offloaded_bytes == 0 and store.resident_bytes == 0
    store.close()
