"""SPRNet model: sparse fusion vs dense convs, anchor bookkeeping, torchvision output format, overfitting one batch."""

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from box_targets import box_target
from PIL import Image, ImageDraw
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from effdl.errors import EffdlError
from effdl.sprnet import build_detector
from effdl.sprnet.model import GatedFPN
from effdl.sprnet.spr_head import (
    SPRMaskHead,
    blocks_to_map,
    conv_at,
    deconv2x2,
    location_coords,
    mask_frames,
    mask_positives,
    mask_targets,
)


@pytest.mark.parametrize("kernel,dilation", [(1, 1), (3, 1), (3, 2), (3, 4), (3, 6)])
def test_conv_at_equals_dense_convolution_and_its_gradients(kernel, dilation):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 5, kernel, padding=dilation * (kernel // 2), dilation=dilation).double()
    feature = torch.randn(2, 8, 9, 11, dtype=torch.double, requires_grad=True)
    image = torch.tensor([0, 1, 1, 0, 1, 0])
    y = torch.tensor([0, 8, 4, 8, 0, 3])  # corners and edges exercise the zero padding
    x = torch.tensor([0, 10, 5, 0, 10, 7])
    sparse = conv_at(feature, image, y, x, conv)
    dense = conv(feature)[image, :, y, x]
    torch.testing.assert_close(sparse, dense)
    weights = torch.randn_like(dense)
    grads_sparse = torch.autograd.grad((sparse * weights).sum(), (feature, conv.weight, conv.bias))
    grads_dense = torch.autograd.grad((dense * weights).sum(), (feature, conv.weight, conv.bias))
    for gs, gd in zip(grads_sparse, grads_dense, strict=True):
        torch.testing.assert_close(gs, gd)


@pytest.mark.parametrize("n,size,relu", [(4, 1, False), (4, 3, False), (3, 2, True), (0, 2, False), (2, 4, False)])
def test_deconv2x2_equals_the_transposed_convolution_and_its_gradients(n, size, relu):
    deconv = torch.nn.ConvTranspose2d(6, 5, 2, stride=2)  # 6 input channels: rows < 6 and rows >= 6 both occur
    x = torch.randn(n, 6, 2 ** size, 2 ** size, requires_grad=True)
    reference = deconv(x).relu() if relu else deconv(x)
    # the map's pixels as rows in the block order of `size` earlier 2x2 stages: (n, dy_1, dx_1, ..., dy_s, dx_s, C)
    order = (0, *(d for i in range(size) for d in (2 + i, 2 + size + i)), 1)
    rows = x.reshape(n, 6, *(2,) * (2 * size)).permute(order).reshape(-1, 6)
    ours = blocks_to_map(deconv2x2(rows, deconv, relu=relu), n, size + 1)
    torch.testing.assert_close(ours, reference)
    grad = torch.randn_like(reference)
    got = torch.autograd.grad(ours, (x, deconv.weight, deconv.bias), grad)
    want = torch.autograd.grad(reference, (x, deconv.weight, deconv.bias), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)  # sums over up to 2,048 pixels, in another order


@pytest.mark.parametrize("mask_size", [16, 32])
def test_mask_head_equals_its_layers_run_densely(mask_size):
    torch.manual_seed(0)
    head = SPRMaskHead(8, 3, mask_size=mask_size)
    features = [torch.randn(2, 8, 6, 5), torch.randn(2, 8, 3, 3), torch.randn(2, 8, 1, 1)]  # the last level: unused
    image, location = torch.tensor([1, 0, 1, 0]), torch.tensor([29, 3, 31, 38])  # levels 0, 0, 1, 1
    level, y, x = location_coords(location, [f.shape[-2:] for f in features])
    dense = [[torch.relu(conv(f)) for conv in (head.point, *head.dilated)] for f in features]  # (B, C_out, H, W)
    fused = torch.stack([torch.cat([out[i, :, r, c] for out in dense[lvl]])
                         for i, lvl, r, c in zip(image, level, y, x, strict=True)])
    coarse = fused[:, :, None, None]
    for deconv in head.reconstruct:
        coarse = deconv(coarse)
    fine = coarse
    for deconv in head.refine:
        fine = torch.relu(deconv(fine))
    shortcut = torch.nn.functional.interpolate(head.shortcut(coarse), size=(mask_size,) * 2, mode="bilinear")
    reference = head.logits(fine) + shortcut
    ours = head(features, image, location)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    none = torch.zeros(0, dtype=torch.long)
    assert head(features, none, none).shape == (0, 3, mask_size, mask_size)
    grad = torch.randn_like(reference)
    params = list(head.parameters())
    for got, want in zip(torch.autograd.grad(ours, params, grad), torch.autograd.grad(reference, params, grad),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_location_coords_name_the_anchor_position_the_anchor_generator_used():
    model = build_detector("sprnet_resnet18_fpn", 3, smallest_anchor=16)
    sizes = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
    features = [torch.zeros(1, 256, h, w) for h, w in sizes]
    anchors = model.anchor_generator(ImageList(torch.zeros(1, 3, 96, 128), [(96, 128)]), features)[0]
    num_anchors = model.anchor_generator.num_anchors_per_location()[0]
    anchor_idx = torch.arange(len(anchors))
    level, y, x = location_coords(anchor_idx // num_anchors, sizes)
    stride_y = torch.tensor([96 // h for h, _ in sizes])[level]
    stride_x = torch.tensor([128 // w for _, w in sizes])[level]
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    torch.testing.assert_close(centers, torch.stack([x * stride_x, y * stride_y], 1).float(), atol=0.5, rtol=0)
    smallest = torch.tensor([model.anchor_generator.sizes[lvl][0] for lvl in level.tolist()])
    assert ((anchors[:, 2] - anchors[:, 0]) >= smallest * 0.7 - 1).all()  # each anchor sits on its own level


def test_mask_positives_match_a_brute_force_loop():
    generator = torch.Generator().manual_seed(0)
    iou = torch.rand(3, 40 * 9, generator=generator) ** 3  # (G, L * A), few above 0.7
    location, gt = mask_positives(iou, num_anchors=9, fg_iou_thresh=0.7)
    expected = {}
    for loc in range(40):
        best = max((iou[g, loc * 9 + a].item(), g) for g in range(3) for a in range(9))
        if best[0] > 0.7:
            expected[loc] = best[1]
    for g in range(3):  # every box also claims its best location
        expected[max(range(40), key=lambda loc, g=g: iou[g, loc * 9:(loc + 1) * 9].max().item())] = g
    assert dict(zip(location.tolist(), gt.tolist(), strict=True)) == expected


def test_mask_frames_take_the_predicted_box_only_where_it_overlaps_the_truth_by_half():
    truth = torch.tensor([[10.0, 10, 30, 30]] * 4 + [[0.0, 0, 8, 4]])
    predicted = torch.tensor([[10.0, 10, 30, 30], [12, 12, 32, 32], [20, 20, 40, 40], [10, 10, 30, 20], [4, 2, 4, 3]])
    frames = mask_frames(predicted, truth)
    iou = box_iou(predicted, truth).diagonal()  # 1, 0.68, 0.14, exactly 0.5, 0 (an empty predicted box)
    torch.testing.assert_close(frames, torch.where((iou >= 0.5)[:, None], predicted, truth))
    assert frames[:, 0].tolist() == [10, 12, 10, 10, 0]


def test_mask_targets_crop_each_boxs_owner_mask():
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 40, 50, generator=generator) > 0.5).to(torch.uint8)
    boxes = torch.tensor([[0.0, 0, 20, 20], [5, 7, 21, 23], [10, 0, 50, 40], [2.5, 3.5, 17.25, 30]])
    owners = torch.tensor([2, 0, 2, 1])
    crops = mask_targets(masks, boxes, 16, owners=owners)
    for crop, box, owner in zip(crops, boxes, owners, strict=True):
        torch.testing.assert_close(crop, mask_targets(masks[owner][None], box[None], 16)[0])
    # a 16-pixel integer box at 16 x 16: each bin is one pixel, sampled at its centre
    torch.testing.assert_close(crops[1], masks[0, 7:23, 5:21].float())


def test_fcos_positives_learn_masks_in_their_predicted_boxes_when_asked():
    torch.manual_seed(0)
    image, target = _shape_sample(0)
    # P3-P7: on this sample the 5-stride squares there overlap some boxes by IoU 0.5 and some less
    model = build_detector("sprnet_fcos_resnet18_fpn", 3, min_size=96, max_size=96, mask_in_predicted_boxes=True,
                           p2_level=False)
    regression = model.head.regression_head.bbox_reg
    torch.nn.init.zeros_(regression.weight)
    # Every location then predicts the square of side 5 strides centred on it (softplus(log(e^2.5 - 1)) = 2.5).
    torch.nn.init.constant_(regression.bias, math.log(math.expm1(2.5)))
    seen = []
    model.mask_loss = lambda features, targets, positives, scale: seen.extend(positives) or torch.zeros(())
    model.train()([image], [target])
    (location, gt, frame), = seen
    features = list(model.backbone(model.transform([image])[0].tensors).values())
    anchors = model.anchor_generator(ImageList(torch.zeros(1, 3, 96, 96), [(96, 96)]), features)[0][location]
    centres, stride = (anchors[:, :2] + anchors[:, 2:]) / 2, anchors[:, 2:] - anchors[:, :2]
    squares = torch.cat([centres - 2.5 * stride, centres + 2.5 * stride], 1)
    truth = target["boxes"][gt]
    iou = box_iou(squares, truth).diagonal()
    assert (iou >= 0.5).any() and (iou < 0.5).any(), "the case needs both kinds of positive"
    torch.testing.assert_close(frame, torch.where((iou >= 0.5)[:, None], squares, truth))


def test_gated_fpn_with_open_gates_equals_torchvision_fpn():
    torch.manual_seed(0)
    plain = FeaturePyramidNetwork([16, 32, 64], 24, LastLevelP6P7(24, 24))
    gated = GatedFPN([16, 32, 64], 24, LastLevelP6P7(24, 24))
    gated.load_state_dict(plain.state_dict(), strict=False)
    torch.nn.init.zeros_(gated.gate[1].weight)
    torch.nn.init.constant_(gated.gate[1].bias, 50.0)  # sigmoid(50) == 1 in float32
    x = OrderedDict(a=torch.randn(2, 16, 16, 16), b=torch.randn(2, 32, 8, 8), c=torch.randn(2, 64, 4, 4))
    for (name, p), (gname, g) in zip(plain(x).items(), gated(x).items(), strict=True):
        assert name == gname
        torch.testing.assert_close(g, p)
    torch.nn.init.constant_(gated.gate[1].bias, -2.0)
    assert not torch.allclose(gated(x)["a"], plain(x)["a"])


SPR_MODELS = ("sprnet_resnet18_fpn", "sprnet_fcos_resnet18_fpn")  # SPR on RetinaNet (the paper's) and on FCOS


def _anchor_kwargs(name: str, smallest_anchor: int = 16) -> dict[str, int]:
    return {} if "fcos" in name else {"smallest_anchor": smallest_anchor}


@pytest.mark.parametrize("name", SPR_MODELS)
def test_outputs_have_mask_rcnn_format_for_images_of_different_sizes(name):
    torch.manual_seed(0)
    images = [torch.rand(3, 96, 128), torch.rand(3, 128, 80)]
    targets = [box_target([[10, 20, 60, 70], [70, 5, 120, 40]], [1, 2], (96, 128)), box_target([], [], (128, 80))]
    sprnet = build_detector(name, 3, min_size=96, max_size=128, score_thresh=0.0, mask_score_thresh=0.0)
    maskrcnn = build_detector("maskrcnn_resnet18_fpn", 3, min_size=96, max_size=128, box_score_thresh=0.0)
    for model in (sprnet, maskrcnn):
        losses = model.train()(images, targets)
        assert "loss_mask" in losses
        assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        ours, theirs = sprnet.eval()(images), maskrcnn.eval()(images)
    assert len(ours) == len(theirs) == 2
    for image, a, b in zip(images, ours, theirs, strict=True):
        assert a.keys() == b.keys() == {"boxes", "labels", "scores", "masks"}
        assert len(a["boxes"]) > 0
        for key in a:
            assert a[key].dtype == b[key].dtype
            assert a[key].shape[1:] == b[key].shape[1:]
        assert a["masks"].shape[1:] == (1, *image.shape[1:])
        assert ((a["masks"] >= 0) & (a["masks"] <= 1)).all()
        assert (a["labels"] > 0).all() or len(a["labels"]) == 0


@pytest.mark.parametrize("name", SPR_MODELS)
def test_each_mask_is_decoded_at_its_own_detections_anchor_location(name):
    torch.manual_seed(0)
    model = build_detector(name, 3, min_size=128, max_size=128, score_thresh=0.0, mask_score_thresh=0.0,
                           detections_per_img=50, **_anchor_kwargs(name)).eval()
    regression = model.head.regression_head.bbox_reg
    torch.nn.init.zeros_(regression.weight)
    # Every detection's box is then its anchor, clipped to the image: RetinaNet's offsets are 0, FCOS's distances
    # to the sides are half the location's square (softplus(log(e^0.5 - 1)) = 0.5).
    torch.nn.init.constant_(regression.bias, math.log(math.expm1(0.5)) if "fcos" in name else 0.0)
    calls = []
    model.mask_head.register_forward_hook(lambda module, args, out: calls.append(args[1:]))
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    with torch.no_grad():
        detections = model(images)
        features = list(model.backbone(model.transform(images)[0].tensors).values())
    anchors = model.anchor_generator(ImageList(torch.zeros(2, 3, 128, 128), [(128, 128)] * 2), features)[0]
    num_anchors = model.anchor_generator.num_anchors_per_location()[0]
    (image_idx, location), = calls
    start = 0
    for i, det in enumerate(detections):
        n = len(det["boxes"])
        assert n > 0 and (image_idx[start:start + n] == i).all()
        for box, loc in zip(det["boxes"], location[start:start + n], strict=True):
            candidates = anchors[loc * num_anchors:(loc + 1) * num_anchors].clamp(0, 128)
            assert (candidates - box).abs().sum(1).min() < 1e-3, "mask decoded at another location than its box"
        start += n


def _shape_sample(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A 96-px image with an ellipse (label 1) and a triangle (label 2) on a noisy background."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(3, 96, 96, generator=generator) * 0.3
    masks, boxes = [], []
    for label, (x0, y0, side) in ((1, (8 + seed * 4, 10, 40)), (2, (50, 40 - seed * 6, 36))):
        canvas = Image.new("L", (96, 96))
        if label == 1:
            ImageDraw.Draw(canvas).ellipse([x0, y0, x0 + side, y0 + side], fill=1)
        else:
            ImageDraw.Draw(canvas).polygon([(x0, y0 + side), (x0 + side // 2, y0), (x0 + side, y0 + side)], fill=1)
        mask = torch.from_numpy(np.array(canvas)).bool()
        image[:, mask] = torch.tensor([0.9, 0.2, 0.1] if label == 1 else [0.1, 0.8, 0.3])[:, None]
        ys, xs = mask.nonzero(as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        masks.append(mask)
    return image, {"boxes": torch.tensor(boxes, dtype=torch.float), "labels": torch.tensor([1, 2]),
                   "masks": torch.stack(masks).to(torch.uint8)}


@pytest.mark.parametrize("name", SPR_MODELS)
def test_overfitting_one_small_batch_reaches_high_mask_iou(name):
    torch.manual_seed(0)
    images, targets = zip(*(_shape_sample(seed) for seed in (0, 1)), strict=True)
    model = build_detector(name, 3, min_size=96, max_size=96, **_anchor_kwargs(name))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    # Decayed to zero, as in real training: at a constant rate the end point swings by +-0.15 mask IoU between steps.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 100)
    for _ in range(100):
        loss = sum(model.train()(list(images), list(targets)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        detections = model.eval()(list(images))
    for det, target in zip(detections, targets, strict=True):
        for box, label, gt_mask in zip(target["boxes"], target["labels"], target["masks"].bool(), strict=True):
            same_class = (det["labels"] == label).nonzero().flatten()
            assert len(same_class), f"no detection of class {label}"
            best = same_class[box_iou(det["boxes"][same_class], box[None])[:, 0].argmax()]
            predicted = det["masks"][best, 0] > 0.5
            iou = (predicted & gt_mask).sum() / (predicted | gt_mask).sum()
            assert iou > 0.8, f"mask IoU {iou:.3f} for class {label}"


@pytest.mark.parametrize("name", SPR_MODELS)
def test_mask_loss_weight_scales_the_mask_loss_only(name):
    images, targets = zip(*(_shape_sample(seed) for seed in (0, 1)), strict=True)
    losses = []
    for weight in (1.0, 4.0):
        torch.manual_seed(0)  # the same weights and the same sampled mask positives
        model = build_detector(name, 3, min_size=96, max_size=96, mask_loss_weight=weight, **_anchor_kwargs(name))
        losses.append(model.train()(list(images), list(targets)))
    for key, value in losses[0].items():
        torch.testing.assert_close(losses[1][key], 4.0 * value if key == "loss_mask" else value)
    with pytest.raises(ValueError, match="mask_loss_weight must be positive"):
        build_detector(name, 3, mask_loss_weight=0.0, **_anchor_kwargs(name))


@pytest.mark.parametrize("name", SPR_MODELS)
def test_bad_training_targets_get_clear_errors(name):
    model = build_detector(name, 3).train()
    image = torch.rand(3, 64, 64)
    degenerate = box_target([[10, 10, 30, 40], [20, 20, 20, 30]], [1, 2], (64, 64))
    with pytest.raises(ValueError, match=r"invalid box \[20.0, 20.0, 20.0, 30.0\] for target at index 1"):
        model([image, image], [box_target([], [], (64, 64)), degenerate])
    no_masks = {k: v for k, v in degenerate.items() if k != "masks"}
    with pytest.raises(ValueError, match="target 0: 'masks' must be"):
        model([image], [no_masks])
    with pytest.raises(ValueError, match="one target dict per image"):
        model([image])
    with pytest.raises(EffdlError, match="unknown model 'sprnet_vgg'"):
        build_detector("sprnet_vgg", 3)


@pytest.mark.parametrize("name", SPR_MODELS)
def test_bf16_autocast_trains_and_detects(name):
    """The GPU trainer runs under bf16 autocast; CPU autocast exercises the same dtype paths."""
    torch.manual_seed(0)
    model = build_detector(name, 3, min_size=64, max_size=64, score_thresh=0.0, mask_score_thresh=0.0)
    image, target = torch.rand(3, 64, 64), box_target([[10, 10, 40, 40]], [1], (64, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.train()([image], [target])
        sum(losses.values()).backward()
        with torch.no_grad():
            detection = model.eval()([image])[0]
    assert all(torch.isfinite(v) for v in losses.values())
    assert detection["masks"].shape == (len(detection["boxes"]), 1, 64, 64) and len(detection["boxes"]) > 0
