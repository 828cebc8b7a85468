import pytest
import torch

import effdl.core.data as data
from effdl.core.data import IMAGE_STATS, SHAPES10, SHAPES10_CLASSES, default_image_set, load_images, shapes10
from effdl.errors import EffdlError
from effdl.soft.train import ImageTrainConfig, train_classifier
from effdl.train.checkpoint import saved_config


def test_shapes10_is_deterministic_balanced_and_prefix_stable():
    images, labels = shapes10(2500, seed=0)
    assert images.shape == (2500, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    again, again_labels = shapes10(1200, seed=0)
    assert torch.equal(again, images[:1200]) and torch.equal(again_labels, labels[:1200])
    assert not torch.equal(shapes10(1000, seed=1)[0], images[:1000])
    assert labels[:2000].bincount().tolist() == [200] * len(SHAPES10_CLASSES)
    mean, std = IMAGE_STATS[SHAPES10]
    pixels = images.float() / 255
    assert abs(pixels.mean() - mean) < 0.01 and abs(pixels.std() - std) < 0.01
    test = load_images(SHAPES10, train=False, limit=100)
    assert test.images.shape == (100, 28, 28) and test.classes == SHAPES10_CLASSES
    assert not torch.equal(test.images, images[:100])  # the test split has its own seed


def _no_fashion_mnist(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DEB_DIR", tmp_path / "not-installed")
    monkeypatch.setenv("EFFDL_CACHE", str(tmp_path / "cache"))


def test_without_fashion_mnist_the_default_is_generated_and_nothing_downloads(monkeypatch, tmp_path):
    from torchvision.datasets import FashionMNIST

    _no_fashion_mnist(monkeypatch, tmp_path)

    def no_download(self):
        raise AssertionError("Fashion-MNIST download attempted")

    monkeypatch.setattr(FashionMNIST, "download", no_download)
    assert default_image_set() == SHAPES10
    with pytest.raises(EffdlError, match=r"Fashion-MNIST is not available.*apt-get install dataset-fashion-mnist"
                                         r".*--data shapes10"):
        load_images("fashion-mnist", train=True)
    raw = tmp_path / "cache" / "datasets" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data._FASHION_FILES:
        (raw / name).touch()
    assert default_image_set() == "fashion-mnist"  # files put in the cache by hand count as installed


def test_soft_trains_on_shapes10(tmp_path):
    cfg = ImageTrainConfig(model="soft_tiny", data=SHAPES10, img_size=32, epochs=1.0, batch_size=32, lr=2e-3,
                           warmup_epochs=0.2, train_subset=2048, eval_subset=500, out_dir=str(tmp_path))
    result = train_classifier(cfg, progress=False)
    assert result.step == 64
    assert result.metrics["top1"] > 30.0, result.evals  # chance is 10%; 48% here after 64 steps of 32 images
    assert saved_config(result.checkpoint, "effdl soft train")["data"] == SHAPES10
