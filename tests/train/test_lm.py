import math

import pytest
import torch

from effdl.core.config import ModelConfig
from effdl.core.hf import load_checkpoint
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError
from effdl.train.checkpoint import latest_checkpoint
from effdl.train.lm import TrainConfig, resume_config, train
from effdl.train.loop import warmup_cosine_lr


def _cfg(tmp_path, **kw):
    base = dict(preset="tiny", seq_len=64, batch_size=8, steps=40, lr=3e-3, warmup_steps=5, eval_every=0,
                eval_batches=4, out_dir=str(tmp_path))
    return TrainConfig(**{**base, **kw})


def test_training_lowers_validation_loss(tmp_path):
    result = train(_cfg(tmp_path, eval_every=40), progress=False)
    untrained = math.log(258)
    assert result.metrics["val_loss"] < untrained - 2.0, result.evals  # well below a uniform guess (5.55 nats)
    assert result.losses[-1][1] < result.losses[0][1] - 2.0
    assert result.checkpoint == tmp_path / "checkpoint-000040"
    assert load_checkpoint(result.checkpoint).config == ModelConfig.preset("tiny")


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = train(_cfg(tmp_path / "full", steps=8), progress=False)
    first = train(_cfg(tmp_path / "split", steps=8, ckpt_every=4), progress=False)
    assert [loss for _, loss in first.losses] == [loss for _, loss in full.losses]

    # Resume from step 4 of the split run and compare steps 5..8 with the uninterrupted run.
    ckpt = tmp_path / "split" / "checkpoint-000004"
    resumed = train(resume_config(ckpt), resume=ckpt, progress=False)
    assert resumed.step == 8
    assert resumed.losses[4:] == full.losses[4:]
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_train_given_model_and_lr_schedule(tmp_path):
    def lr_at(step):
        return warmup_cosine_lr(step, total_steps=100, warmup_steps=10, peak_lr=1.0, min_ratio=0.1)

    assert lr_at(0) == pytest.approx(0.1)
    assert lr_at(9) == pytest.approx(1.0)
    assert lr_at(55) == pytest.approx(0.55)
    assert lr_at(100) == pytest.approx(0.1)
    model = Transformer(ModelConfig.preset("tiny", n_layers=1))
    result = train(_cfg(tmp_path, steps=2), model=model, progress=False)
    assert load_checkpoint(result.checkpoint).config.n_layers == 1


def test_bad_train_input(tmp_path):
    with pytest.raises(EffdlError, match="seq_len must be positive"):
        _cfg(tmp_path, seq_len=0)
    with pytest.raises(EffdlError, match="neither a checkpoint folder nor a run folder"):
        latest_checkpoint(tmp_path)
