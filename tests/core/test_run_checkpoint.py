import pytest
import torch

from effdl.core.run_checkpoint import epoch_batches, read_run_checkpoint, restore_run, save_run_checkpoint
from effdl.errors import EffdlError


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_each_epoch_is_a_seeded_permutation_without_its_ragged_tail():
    batches = _take(epoch_batches(10, 3, seed=7), 6)  # 3 steps per epoch; one item per epoch is skipped
    for epoch in range(2):
        seen = torch.cat(batches[3 * epoch:3 * epoch + 3])
        assert len(seen) == 9 and len(set(seen.tolist())) == 9
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(7 + epoch))[:9]
        assert torch.equal(seen, expected)
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:]))


def test_resuming_at_any_step_sees_the_same_batches():
    reference = _take(epoch_batches(10, 3, seed=0), 8)
    for start in (1, 3, 5):
        resumed = _take(epoch_batches(10, 3, seed=0, start_step=start), 8 - start)
        assert all(torch.equal(a, b) for a, b in zip(reference[start:], resumed, strict=True))


def test_fewer_items_than_a_batch_still_yield_one_step_per_epoch():
    first, second = _take(epoch_batches(2, 4, seed=0), 2)
    assert sorted(first.tolist()) == sorted(second.tolist()) == [0, 1]


def test_checkpoint_round_trip_and_newest_in_a_run_folder(tmp_path):
    for step in (5, 10):
        path = save_run_checkpoint(tmp_path / "run", "net", step, {"model": {"w": torch.full((2,), step)},
                                                                  "history": [{"step": step}]})
    assert path.name == "net-step000010.pth" and (tmp_path / "run" / "net-history.json").is_file()
    newest = read_run_checkpoint(tmp_path / "run", {"model"}, "effdl x train")
    assert newest["step"] == 10 and torch.equal(newest["model"]["w"], torch.full((2,), 10))
    assert read_run_checkpoint(tmp_path / "run" / "net-step000005.pth", {"model"}, "effdl x train")["step"] == 5


def test_restore_run_loads_weights_optimizer_and_the_loss_record(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": [{"step": 1}],
             "losses": [(1, 0.5)]}
    path = save_run_checkpoint(tmp_path, "net", 1, state)
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    loaded = read_run_checkpoint(path, {"model"}, "effdl x train")
    assert restore_run(loaded, fresh, fresh_optimizer) == (1, [{"step": 1}], [(1, 0.5)])
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_optimizer.state[fresh.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])
    del loaded["losses"]  # written before per-step losses were kept
    assert restore_run(loaded, fresh, fresh_optimizer) == (1, [{"step": 1}], [])


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(EffdlError, match="does not exist"):
        read_run_checkpoint(tmp_path / "missing.pth", {"model"}, "effdl x train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EffdlError, match="holds no checkpoint"):
        read_run_checkpoint(tmp_path / "empty", {"model"}, "effdl x train")
    torch.save({"step": 1}, tmp_path / "other.pth")
    with pytest.raises(EffdlError, match="not a checkpoint written by `effdl x train`"):
        read_run_checkpoint(tmp_path / "other.pth", {"model"}, "effdl x train")
