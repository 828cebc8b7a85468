import subprocess
import sys

import pytest
import timm
import torch

from effdl.errors import EffdlError
from effdl.soft.train import ImageTrainConfig, load_classifier, train_classifier
from effdl.train.checkpoint import read_weights


def _cfg(tmp_path, **kw):
    base = dict(model="soft_tiny", img_size=32, epochs=1.0, batch_size=32, lr=2e-3, warmup_epochs=0.2,
                train_subset=1024, eval_subset=500, out_dir=str(tmp_path))
    return ImageTrainConfig(**{**base, **kw})


def test_short_training_learns_fashion_mnist(tmp_path):
    result = train_classifier(_cfg(tmp_path), progress=False)
    assert result.step == 32
    assert result.metrics["top1"] > 30.0, result.evals  # chance is 10%; 39% here after 32 steps of 32 images
    model, cfg = load_classifier(result.checkpoint)
    assert cfg.model == "soft_tiny" and cfg.img_size == 32
    overlay = {"file": str(result.checkpoint / "model.safetensors"), "num_classes": 10}  # the README's recipe
    via_timm = timm.create_model("soft_tiny", num_classes=10, in_chans=1, img_size=32, pretrained=True,
                                 pretrained_cfg_overlay=overlay)
    for (name, a), b in zip(model.state_dict().items(), via_timm.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_resume_is_bit_exact(tmp_path):
    """A run stopped after its first step and resumed matches an uninterrupted one bit for bit: every step's loss,
    the final evaluation and every weight. 16 images in batches of 4 and 1.25 epochs: the 4 resumed steps run
    through warmup into the cosine and into the second epoch's order."""
    kw = dict(epochs=1.25, batch_size=4, warmup_epochs=0.5, train_subset=16, eval_subset=8)
    full = train_classifier(_cfg(tmp_path / "full", **kw), progress=False)
    stopped = train_classifier(_cfg(tmp_path / "split", max_time_s=0.0, **kw), progress=False)
    assert stopped.step == 1
    resumed = train_classifier(_cfg(tmp_path / "split", **kw), resume=stopped.checkpoint, progress=False)
    assert resumed.step == full.step == 5
    assert resumed.losses == full.losses
    assert resumed.evals[-1] == full.evals[-1]
    a, b = read_weights(full.checkpoint), read_weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_bad_config():
    with pytest.raises(EffdlError, match="unknown model 'nope'"):
        ImageTrainConfig(model="nope")
    with pytest.raises(EffdlError, match="unknown dataset 'cifar'"):
        ImageTrainConfig(data="cifar")


def test_cli_train_with_baseline_and_eval(tmp_path):
    def effdl(*args):
        return subprocess.run([sys.executable, "-m", "effdl.cli", *args], capture_output=True, text=True,
                              timeout=300)

    out = effdl("soft", "train", "--epochs", "0.0625", "--train-subset", "512", "--eval-subset", "64",
                "--img-size", "32", "--batch-size", "16", "--out", str(tmp_path), "--baseline", "pvt_v2_b0")
    assert out.returncode == 0, out.stderr
    assert "soft_tiny" in out.stdout and "pvt_v2_b0" in out.stdout
    checkpoint = tmp_path / "soft_tiny" / "checkpoint-000002"
    out = effdl("soft", "eval", "--checkpoint", str(checkpoint), "--eval-subset", "64")
    assert out.returncode == 0, out.stderr
    assert "top-1" in out.stdout
    out = effdl("soft", "eval", "--checkpoint", str(tmp_path / "missing"))
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    out = effdl("soft", "train", "--img-size", "48", "--train-subset", "64", "--eval-subset", "64")
    assert out.returncode == 2 and "multiple of 32" in out.stderr
