"""Backbone pretraining on object crops (the ImageNet stand-in) and loading the result into a detector."""

import subprocess
import sys

import pytest
import torch
from torchvision.models import resnet18, resnet50

from effdl.errors import EffdlError
from effdl.sprnet.data import CocoInstances, write_shapes_dataset
from effdl.sprnet.model import resnet_fpn, sprnet_resnet18_fpn
from effdl.sprnet.pretrain import object_crops, pretrain_backbone

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, "train", num_images=24, image_size=48, seed=3)
    return CocoInstances(root, "train")


def test_object_crops_cover_every_annotation_in_order(shapes):
    crops, labels = object_crops(shapes, size=16)
    expected = torch.cat([shapes[i][1]["labels"] - 1 for i in range(len(shapes))])
    assert crops.shape == (len(expected), 3, 16, 16) and torch.equal(labels, expected)
    assert crops.min() >= 0 and crops.max() <= 1
    few, _ = object_crops(shapes, size=16, max_crops=5)  # stops after the image that reaches the cap
    assert 5 <= len(few) < len(crops) and torch.equal(few, crops[:len(few)])


def test_object_crops_at_pixel_aligned_boxes_equal_slicing():
    image = torch.rand(3, 40, 40)

    class OneImage:
        ann_file = "mem"

        def __len__(self):
            return 1

        def __getitem__(self, index):
            boxes = torch.tensor([[10.0, 12.0, 18.0, 20.0], [4.0, 6.0, 16.0, 10.0]])  # 8x8 and 12x4 boxes
            return image, {"boxes": boxes, "labels": torch.tensor([2, 5])}

    crops, labels = object_crops(OneImage(), size=8, context=1.0)
    torch.testing.assert_close(crops[0], image[:, 12:20, 10:18])  # 1 pixel per bin: exact pixel centres
    assert labels.tolist() == [1, 4]
    crops, _ = object_crops(OneImage(), size=12, context=1.0)
    torch.testing.assert_close(crops[1], image[:, 2:14, 4:16])  # the square around a 12x4 box


def test_pretrained_backbone_learns_the_classes_and_loads_into_sprnet(shapes, tmp_path):
    state, accuracy = pretrain_backbone(shapes, "resnet18", steps=40, batch_size=32, lr=3e-3, crop_size=32,
                                        progress=False)
    assert accuracy > 0.6  # five classes: chance is 0.2
    assert not any(k.startswith("fc.") for k in state)
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model = sprnet_resnet18_fpn(6, weights_backbone=path)
    loaded = model.backbone.body.state_dict()
    for name, value in loaded.items():
        torch.testing.assert_close(value, state[name], msg=name)


def test_backbone_weights_of_another_architecture_are_refused_by_name(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(resnet50().state_dict(), path)
    with pytest.raises(EffdlError, match=r"r50.pth is not a torchvision resnet18 state dict"):
        resnet_fpn("resnet18", path)
    torch.save(resnet18(num_classes=7).state_dict(), path)  # another classifier is fine: it is dropped
    resnet_fpn("resnet18", path)
    with pytest.raises(EffdlError, match="backbone weights file not found"):
        resnet_fpn("resnet18", tmp_path / "missing.pth")


def test_pretrain_refuses_bad_arguments(shapes):
    with pytest.raises(EffdlError, match="unknown backbone 'vgg'"):
        pretrain_backbone(shapes, "vgg")
    with pytest.raises(EffdlError, match="steps and batch_size must be positive"):
        pretrain_backbone(shapes, steps=0)


def test_cli_pretrain_writes_loadable_weights(tmp_path):
    root = tmp_path / "shapes"
    write_shapes_dataset(root, "train", num_images=6, image_size=48, seed=0)
    out = tmp_path / "w" / "r18.pth"
    run = subprocess.run([sys.executable, "-m", "effdl.cli", "sprnet", "pretrain", "--data", str(root), "--steps", "2",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "crop accuracy" in run.stdout and out.is_file()
    resnet_fpn("resnet18", out)
