"""SPRNet, RetinaNet and Mask R-CNN on a SOFT-FPN backbone: training, detection, strides, checkpoints, padding."""

import pytest
import timm
import torch
from box_targets import box_target
from torchvision.ops.misc import FrozenBatchNorm2d

from effdl.errors import EffdlError
from effdl.soft.attention import SoftAttention
from effdl.sprnet import DETECTORS, build_detector
from effdl.sprnet.model import FAMILIES as DETECTOR_FAMILIES
from effdl.sprnet.model import SOFT_BACKBONES, soft_fpn

FAMILIES = ("sprnet", "retinanet", "maskrcnn")
DETECTION_KEYS = {"sprnet": {"boxes", "labels", "scores", "masks"}, "retinanet": {"boxes", "labels", "scores"},
                  "maskrcnn": {"boxes", "labels", "scores", "masks"}}


def _detector(family: str, backbone: str = "soft_tiny", **kwargs) -> torch.nn.Module:
    """Keeps every candidate (up to 20), so an untrained model still detects something."""
    if family == "maskrcnn":
        kwargs |= {"box_score_thresh": 0.0, "box_detections_per_img": 20, "box_batch_size_per_image": 64}
    else:
        kwargs |= {"score_thresh": 0.0, "detections_per_img": 20}
    return build_detector(f"{family}_{backbone}_fpn", 3, smallest_anchor=16, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_detector_on_soft_trains_and_detects_in_the_torchvision_format(family):
    torch.manual_seed(0)
    model = _detector(family, min_size=64, max_size=96)
    images = [torch.rand(3, 64, 96), torch.rand(3, 96, 64)]
    targets = [box_target([[8, 10, 40, 50], [50, 4, 90, 30]], [1, 2], (64, 96)),
               box_target([[5, 20, 60, 90]], [2], (96, 64))]
    losses = model.train()(images, targets)
    assert ("loss_mask" in losses) == (family != "retinanet")
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    stem = model.backbone.body.net.model.stages[0].downsample[0].weight  # the SOFT stem's first conv
    assert stem.grad is not None and torch.isfinite(stem.grad).all() and stem.grad.abs().sum() > 0
    with torch.no_grad():
        detections = model.eval()(images)
    for image, det in zip(images, detections, strict=True):
        assert det.keys() == DETECTION_KEYS[family]
        n = len(det["boxes"])
        assert n > 0 and det["boxes"].shape == (n, 4) and det["scores"].shape == det["labels"].shape == (n,)
        assert (det["labels"] > 0).all() and (det["boxes"][:, 2:] <= torch.tensor(image.shape[:0:-1])).all()
        if "masks" in det:
            assert det["masks"].shape == (n, 1, *image.shape[1:])
            assert ((det["masks"] >= 0) & (det["masks"] <= 1)).all()


@pytest.mark.parametrize("family,names,strides", [("sprnet", ["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128]),
                                                  ("maskrcnn", ["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64])])
def test_soft_fpn_levels_have_the_resnet_fpns_names_and_strides(family, names, strides):
    """SPRNet/RetinaNet read P3-P7 (P6, P7 from P5), Mask R-CNN P2-P5 + pool, whichever the backbone."""
    x = torch.rand(1, 3, 128, 256)
    with torch.no_grad():
        soft = _detector(family).backbone.eval()(x)
        resnet = _detector(family, "resnet18").backbone.eval()(x)
    assert list(soft) == list(resnet) == names
    assert [tuple(f.shape) for f in soft.values()] == [tuple(f.shape) for f in resnet.values()]
    assert [tuple(f.shape[-2:]) for f in soft.values()] == [(128 // s, 256 // s) for s in strides]
    assert all(f.shape[1] == 256 for f in soft.values())


def test_weights_backbone_loads_a_soft_checkpoint_with_frozen_batch_norm(tmp_path):
    torch.manual_seed(1)
    state = timm.create_model("soft_tiny").state_dict()  # a classifier checkpoint, as ImageNet weights come
    path = tmp_path / "soft_tiny.pth"
    torch.save(state, path)
    torch.manual_seed(2)
    body = build_detector("sprnet_soft_tiny_fpn", 3, weights_backbone=path).backbone.body.net.model
    fresh = build_detector("sprnet_soft_tiny_fpn", 3).backbone.body.net.model
    loaded = body.state_dict()
    assert len(loaded) > 100 and all(f"head.{k}" not in loaded for k in ("weight", "bias"))
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    key = "stages.2.blocks.0.attn.q.weight"
    assert not torch.equal(fresh.state_dict()[key], state[key])  # without the file, another initialisation
    stem_norm = body.stages[0].downsample[1]
    assert isinstance(stem_norm, FrozenBatchNorm2d) and not isinstance(fresh.stages[0].downsample[1],
                                                                       FrozenBatchNorm2d)
    with pytest.raises(EffdlError, match="backbone weights file not found"):
        soft_fpn("soft_tiny", tmp_path / "missing.pth")


def test_images_not_divisible_by_32_are_padded_by_the_transform():
    torch.manual_seed(0)
    image, target = torch.rand(3, 70, 90), box_target([[10, 12, 50, 60]], [1], (70, 90))
    with pytest.raises(EffdlError, match="multiple of 32"):  # the backbone alone refuses 70 x 90
        soft_fpn("soft_tiny")(image[None])
    for family in FAMILIES:
        model = _detector(family, min_size=70, max_size=90)
        assert model.transform.size_divisible == 32
        batch, _ = model.transform([image])
        assert batch.tensors.shape[-2:] == (96, 96) and batch.image_sizes == [(70, 90)]
        losses = model.train()([image], [target])
        assert all(torch.isfinite(v) for v in losses.values())
        with torch.no_grad():
            det = model.eval()([image])[0]
        assert len(det["boxes"]) > 0 and (det["boxes"][:, 2:] <= torch.tensor([90, 70])).all()
        if "masks" in det:
            assert det["masks"].shape[-2:] == (70, 90)
    with pytest.raises(EffdlError, match="multiple of 32, got size_divisible=16"):
        build_detector("retinanet_soft_tiny_fpn", 3, size_divisible=16)


def test_registry_names_every_soft_variant_for_every_detector():
    soft = set(timm.list_models("soft_*"))
    assert set(SOFT_BACKBONES) == soft and {"soft_tiny", "soft_huge", "soft_norm_tiny", "soft_norm_huge"} <= soft
    backbones = soft | {"resnet18", "resnet50"}
    assert set(DETECTORS) == {f"{family}_{name}_fpn" for family in DETECTOR_FAMILIES for name in backbones}
    assert {"sprnet", "sprnet_fcos", "retinanet", "maskrcnn"} == set(DETECTOR_FAMILIES)
    norm = build_detector("retinanet_soft_norm_tiny_fpn", 3).backbone.body.net.model
    attention = [m for m in norm.modules() if isinstance(m, SoftAttention)]
    assert attention and all(m.pinv_mode == "soft_norm" for m in attention)  # SOFT++, not SOFT
    with pytest.raises(EffdlError, match="unknown model 'sprnet_soft_tinyy_fpn'"):
        build_detector("sprnet_soft_tinyy_fpn", 3)
