"""The one training loop and its checkpoint format, on a linear model small enough to check by hand."""

import json
import math

import pytest
import torch
from torch import nn

from effdl.errors import EffdlError
from effdl.train.batches import EpochOrder
from effdl.train.checkpoint import latest_checkpoint, read_trainer_state, read_weights, saved_config
from effdl.train.loop import LoopConfig, TrainTask, fit, warmup_cosine_lr


def _orders(num_items, batch_size, seed, steps):
    order = EpochOrder(num_items, batch_size, seed)
    return [order(step) for step in steps]


def test_each_epoch_is_a_seeded_permutation_without_its_ragged_tail():
    batches = _orders(10, 3, seed=7, steps=range(6))  # 3 steps per epoch; one item per epoch is skipped
    for epoch in range(2):
        seen = torch.cat(batches[3 * epoch:3 * epoch + 3])
        assert len(seen) == 9 and len(set(seen.tolist())) == 9
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(7 + epoch))[:9]
        assert torch.equal(seen, expected)
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:]))


def test_the_batch_of_a_step_does_not_depend_on_the_steps_read_before():
    reference = _orders(10, 3, seed=0, steps=range(8))
    for start in (1, 3, 5):
        resumed = _orders(10, 3, seed=0, steps=range(start, 8))
        assert all(torch.equal(a, b) for a, b in zip(reference[start:], resumed, strict=True))


def test_fewer_items_than_a_batch_still_yield_one_step_per_epoch():
    first, second = _orders(2, 4, seed=0, steps=range(2))
    assert sorted(first.tolist()) == sorted(second.tolist()) == [0, 1]


# A regression task: y = x @ w_true over 32 fixed points, batches of 4 drawn by EpochOrder.
X = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5]])


def _task(trainer="effdl test train", config=None, lr=0.05):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    order = EpochOrder(len(X), 4, seed=0)
    return TrainTask(name="linear", model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=lr),
                     batch=lambda step: (X[order(step)], Y[order(step)]),
                     loss=lambda xy: nn.functional.mse_loss(model(xy[0]), xy[1]),
                     evaluate=lambda: {"mse": nn.functional.mse_loss(model(X), Y).item()},
                     trainer=trainer, config=config or {"lr": lr}, extra={"names": ["a", "b"]})


def _loop(tmp_path, **kw):
    return LoopConfig(**{"steps": 20, "lr": 0.05, "warmup_steps": 4, "grad_clip": 1.0, "out_dir": tmp_path,
                         "steps_per_epoch": 8, **kw})


def test_loop_trains_with_the_schedule_and_its_cadence(tmp_path):
    seen_lr = []
    task = _task()
    step_fn = task.optimizer.step

    def recording_step(*args, **kw):
        seen_lr.append(task.optimizer.param_groups[0]["lr"])
        return step_fn(*args, **kw)

    task.optimizer.step = recording_step
    result = fit(task, _loop(tmp_path, eval_every=8, checkpoint_every=10), progress=False)
    assert seen_lr == pytest.approx([warmup_cosine_lr(s, 20, 4, 0.05, 0.1) for s in range(20)])
    assert [e["step"] for e in result.evals] == [8, 16, 20]
    assert [e["epoch"] for e in result.evals] == [1.0, 2.0, 2.5]
    assert result.evals[-1]["train_loss"] == result.losses[-1][1]
    assert result.metrics["mse"] < result.evals[0]["metrics"]["mse"]
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-000010", "checkpoint-000020"]
    assert result.checkpoint == tmp_path / "checkpoint-000020" == latest_checkpoint(tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["evals"] == result.evals and [s for s, _ in history["losses"]] == list(range(1, 21))


def test_checkpoint_holds_weights_and_everything_resume_needs(tmp_path):
    task = _task(config={"lr": 0.05, "note": "x"})
    result = fit(task, _loop(tmp_path, steps=3), progress=False)
    state = read_trainer_state(tmp_path, "effdl test train")
    assert state["folder"] == result.checkpoint and state["step"] == 3 and state["names"] == ["a", "b"]
    assert state["losses"] == result.losses and state["evals"] == result.evals
    weights = read_weights(result.checkpoint)
    assert torch.equal(weights["weight"], task.model.weight.detach())
    assert saved_config(result.checkpoint, "effdl test train") == {"lr": 0.05, "note": "x"}


def test_resume_is_bit_exact(tmp_path):
    """Stopped by the time limit after one step and resumed, a run equals an uninterrupted one bit for bit."""
    full = fit(_task(), _loop(tmp_path / "full", eval_every=8), progress=False)
    stopped = fit(_task(), _loop(tmp_path / "split", eval_every=8, max_time_s=0.0), progress=False)
    assert stopped.step == 1 and stopped.checkpoint == tmp_path / "split" / "checkpoint-000001"
    assert [e["step"] for e in stopped.evals] == [1]  # the time limit evaluates and checkpoints where it stops
    task = _task()
    task.model.load_state_dict(read_weights(stopped.checkpoint))
    resumed = fit(task, _loop(tmp_path / "split", eval_every=8), resume=tmp_path / "split", progress=False)
    assert resumed.step == 20 and resumed.losses == full.losses
    assert [e["step"] for e in resumed.evals] == [1, 8, 16, 20]
    assert resumed.evals[1:] == full.evals
    assert torch.equal(task.model.weight.detach(), read_weights(full.checkpoint)["weight"])


def test_a_loss_that_stops_being_finite_is_named_with_its_step(tmp_path):
    task = _task()
    task.loss = lambda xy: nn.functional.mse_loss(task.model(xy[0]), xy[1]) * math.inf
    with pytest.raises(EffdlError, match=r"loss became inf at step 0; lower the learning rate \(now 0.05\)"):
        fit(task, _loop(tmp_path), progress=False)


def test_without_an_out_dir_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = fit(_task(), _loop(None, steps=2), progress=False)
    assert result.checkpoint is None and list(tmp_path.iterdir()) == []


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(EffdlError, match="does not exist"):
        latest_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EffdlError, match="neither a checkpoint folder nor a run folder"):
        latest_checkpoint(tmp_path / "empty")
    fit(_task(), _loop(tmp_path / "run", steps=1), progress=False)
    with pytest.raises(EffdlError, match="was written by `effdl test train`, not by `effdl soft train`"):
        read_trainer_state(tmp_path / "run", "effdl soft train")
    with pytest.raises(EffdlError, match="holds no model.safetensors"):
        read_weights(tmp_path / "empty")


def test_a_group_with_lr_scale_runs_at_that_multiple_of_the_schedule(tmp_path):
    task = _task()
    weight, bias = task.model.weight, task.model.bias
    task.optimizer = torch.optim.AdamW([{"params": [weight]}, {"params": [bias], "lr_scale": 10.0}], lr=0.05)
    seen = []
    step_fn = task.optimizer.step

    def recording_step(*args, **kw):
        seen.append([g["lr"] for g in task.optimizer.param_groups])
        return step_fn(*args, **kw)

    task.optimizer.step = recording_step
    fit(task, _loop(tmp_path, steps=6, out_dir=None), progress=False)
    schedule = [warmup_cosine_lr(s, 6, 4, 0.05, 0.1) for s in range(6)]
    assert seen == [pytest.approx([lr, 10 * lr]) for lr in schedule]
