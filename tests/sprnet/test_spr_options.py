"""SPRNet's mask options and their math: pasting, mask boxes, maskness, FCOS assignment, score-capped decoding."""

import pytest
import torch
import torch.nn.functional as F
from box_targets import box_target
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import box_iou

from effdl.errors import EffdlError
from effdl.sprnet import build_detector
from effdl.sprnet.model import SoftplusConv2d, fcos_assign
from effdl.sprnet.spr_head import (
    LocalMaskLogits,
    mask_boxes,
    mask_targets,
    maskness,
    paired_box_iou,
    paste_masks,
    scale_boxes,
)


def _random_boxes(n: int, height: int, width: int, generator: torch.Generator, smallest: int = 4) -> torch.Tensor:
    corner = torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
    size = smallest + torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.5, height * 0.5])
    return torch.cat([corner, corner + size], 1)


def test_paste_masks_matches_torchvision_paste():
    """torchvision pads each mask by a pixel and rounds the padded box to whole pixels, which moves a mask's edge by up
    to a pixel; on boxes of 16 px and more the binarised masks still agree closely."""
    generator = torch.Generator().manual_seed(0)
    height, width = 70, 90
    centre = 8 + 16 * torch.rand(12, 2, 1, 1, generator=generator)  # soft discs, as decoded masks are
    radius = 6 + 10 * torch.rand(12, 1, 1, generator=generator)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    masks = torch.sigmoid(radius - ((ys - centre[:, 0]) ** 2 + (xs - centre[:, 1]) ** 2).sqrt())
    boxes = _random_boxes(12, height, width, generator, smallest=16).round()
    ours = paste_masks(masks, boxes, height, width)
    theirs = paste_masks_in_image(masks[:, None], boxes, (height, width))[:, 0]
    assert ours.shape == theirs.shape == (12, height, width)
    inside = (ours > 0.5) & (theirs > 0.5)
    iou = inside.flatten(1).sum(1) / ((ours > 0.5) | (theirs > 0.5)).flatten(1).sum(1).clamp(min=1)
    assert iou.min() > 0.9, iou
    assert (ours - theirs).abs().mean() < 0.01
    assert (ours.sum((1, 2)) - theirs.sum((1, 2))).abs().max() / theirs.sum((1, 2)).max() < 0.1
    # a uniform mask fills exactly its (whole-pixel) box
    full = paste_masks(torch.ones(1, 32, 32), torch.tensor([[10.0, 20.0, 40.0, 50.0]]), height, width)[0] > 0.5
    expected = torch.zeros(height, width, dtype=torch.bool)
    expected[20:50, 10:40] = True
    assert torch.equal(full, expected)
    # mask pixel j covers the box's j-th strip: column 3 of 32 in a 64-px-wide box is image columns 16-17
    column = torch.zeros(1, 32, 32)
    column[0, :, 3] = 1
    pasted = paste_masks(column, torch.tensor([[10.0, 0.0, 74.0, 64.0]]), 64, 90)[0, 32]
    assert torch.equal((pasted > 0.5).nonzero().flatten(), torch.tensor([16, 17]))


def test_scale_boxes_keeps_centres_and_scales_sides():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 4.0, 2.0]])
    torch.testing.assert_close(scale_boxes(boxes, 1.0), boxes)
    torch.testing.assert_close(scale_boxes(boxes, 1.5), torch.tensor([[5.0, 10.0, 35.0, 70.0], [-1.0, -0.5, 5.0, 2.5]]))


@pytest.mark.parametrize("factor", [1.0, 1.5, 2.0])
def test_a_mask_learnt_in_a_scaled_frame_pastes_back_onto_its_object(factor):
    """Training crops the target from the scaled box and inference pastes into the scaled box: the round trip gives
    back the object, including the parts a too-small box cuts off, which only a frame scale above 1 keeps."""
    height, width = 80, 80
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    disc = (((ys - 40) ** 2 + (xs - 36) ** 2) < 15**2).float()  # radius 15 around (36, 40)
    tight = torch.tensor([[21.0, 25.0, 51.0, 55.0]])
    cut = torch.tensor([[25.0, 29.0, 47.0, 51.0]])  # a predicted box 4 px inside the object on every side
    for box in (tight, cut):
        frame = scale_boxes(box, factor)
        target = mask_targets(disc[None], frame, 32)  # (1, 32, 32), as the loss sees it
        pasted = paste_masks(target, frame, height, width)[0] > 0.5
        iou = (pasted & disc.bool()).sum() / (pasted | disc.bool()).sum()
        # at 1x the cut box loses the object's rim (IoU ~0.6); at 1.5x and more its frame holds the whole disc
        assert iou > (0.9 if box is tight or factor >= 1.5 else 0.5), (factor, iou)
        assert (iou > 0.9) == (box is tight or factor >= 1.5), (factor, iou)


def _recording_mask_logits(model: nn.Module) -> list[torch.Tensor]:
    """Every (N, K, M, M) mask-logit tensor ``model`` decodes from now on (SPR's plus any local logits)."""
    recorded, mask_logits = [], model.mask_logits
    model.mask_logits = lambda *args: recorded.append(mask_logits(*args)) or recorded[-1]
    return recorded


def test_mask_frame_scale_pastes_each_mask_in_its_scaled_box():
    model = _trained_a_little("sprnet_fcos_resnet18_fpn")
    logits = _recording_mask_logits(model)
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        model.mask_frame_scale = 1.5
        detection = model([image])[0]
    box_frame = logits[0][torch.arange(len(detection["labels"])), detection["labels"]].sigmoid()
    reference = paste_masks_in_image(box_frame[:, None], scale_boxes(detection["boxes"], 1.5), (64, 64))
    assert len(detection["boxes"]) and detection["masks"].shape == reference.shape
    assert (detection["masks"] - reference).abs().mean() < 0.02  # torchvision's paste, up to its pixel rounding
    with pytest.raises(ValueError, match="mask_frame_scale must be at least 1"):
        build_detector("sprnet_fcos_resnet18_fpn", 3, mask_frame_scale=0.5)


def test_paired_box_iou_is_the_diagonal_of_torchvisions_box_iou():
    generator = torch.Generator().manual_seed(3)
    a, b = _random_boxes(20, 50, 60, generator), _random_boxes(20, 50, 60, generator)
    b[0] = a[0]  # identical
    b[1] = a[1] + 200  # disjoint
    torch.testing.assert_close(paired_box_iou(a, b), box_iou(a, b).diagonal())


def test_iou_quality_trains_the_centerness_branch_on_each_locations_box_iou():
    """With ``iou_quality`` only the centerness loss changes, to BCE against the IoU (torchvision's ``box_iou``) of
    each foreground location's decoded box with its FCOS-assigned ground truth."""
    image = torch.rand(3, 64, 64)
    target = box_target([[8, 10, 40, 44], [36, 30, 60, 60]], [1, 2], (64, 64))
    losses, captured = {}, []
    for iou_quality in (False, True):
        torch.manual_seed(0)
        model = build_detector("sprnet_fcos_resnet18_fpn", 3, min_size=64, max_size=64, iou_quality=iou_quality)
        model.head.register_forward_hook(lambda module, args, out: captured.append(out))
        torch.manual_seed(1)  # the same sampled mask positives
        losses[iou_quality] = model.train()([image], [target])
    for key in ("classification", "bbox_regression", "loss_mask"):
        torch.testing.assert_close(losses[True][key], losses[False][key])
    outputs = captured[1]
    features = list(model.backbone(image[None]).values())  # only their shapes matter here
    anchors = model.anchor_generator(model.transform([image])[0], features)[0]
    matched = fcos_assign(target["boxes"], anchors, [f.shape[-2] * f.shape[-1] for f in features],
                          model.center_sampling_radius)
    foreground = (matched >= 0).nonzero().flatten()
    assert len(foreground)
    predicted = model.box_coder.decode(outputs["bbox_regression"][0, foreground], anchors[foreground])
    iou = box_iou(predicted, target["boxes"][matched[foreground]]).diagonal()
    expected = F.binary_cross_entropy_with_logits(outputs["bbox_ctrness"][0, foreground, 0], iou, reduction="sum")
    torch.testing.assert_close(losses[True]["bbox_ctrness"], expected / len(foreground))
    assert not torch.allclose(losses[True]["bbox_ctrness"], losses[False]["bbox_ctrness"])


def test_local_mask_logits_sample_the_feature_map_inside_each_frame():
    """With the convs set to pass channel 0 through, a frame's logits are that channel bilinearly sampled at the
    centres of the frame's M x M cells, in feature pixels (pixel i's centre at i + 0.5, image pixels / stride)."""
    local = LocalMaskLogits(4, 1, hidden=2)
    with torch.no_grad():
        local.conv.weight.zero_()
        local.conv.weight[0, 0, 1, 1] = 1.0
        local.logits.weight.zero_()
        local.logits.weight[0, 0] = 1.0
    columns = torch.arange(12.0) + 1.0  # a positive ramp along x, 12 x 12 map at stride 8 (96-px image)
    feature = torch.zeros(1, 4, 12, 12)
    feature[0, 0] = columns.expand(12, 12)
    frame = torch.tensor([[0.0, 16.0, 24.0, 56.0, 72.0]])  # image 0, x 16..56, y 24..72
    out = local(feature, frame, 1 / 8, 8)[0, 0]  # (8, 8)
    centres = (16 + (torch.arange(8) + 0.5) * 5) / 8 - 0.5  # feature-pixel coordinates of the cell centres
    torch.testing.assert_close(out, (centres + 1.0).expand(8, 8))


def test_local_mask_features_start_as_plain_spr_and_train():
    image, target = torch.rand(3, 64, 64), box_target([[8, 10, 40, 44], [36, 30, 60, 60]], [1, 2], (64, 64))
    losses, models = [], []
    for local in (False, True):
        torch.manual_seed(0)  # the local branch is built last, so every other weight is the same
        models.append(build_detector("sprnet_fcos_resnet18_fpn", 3, min_size=64, max_size=64, score_thresh=0.0,
                                     mask_score_thresh=0.0, local_mask_features=local))
        torch.manual_seed(1)  # the same sampled mask positives
        losses.append(models[-1].train()([image], [target]))
    for key, value in losses[0].items():
        torch.testing.assert_close(losses[1][key], value)
    losses[1]["loss_mask"].backward()
    assert models[1].local_mask.logits.weight.grad.abs().sum() > 0
    with torch.no_grad():
        plain, local = (m.eval()([image])[0] for m in models)
    torch.testing.assert_close(local["masks"], plain["masks"])


def test_mask_boxes_are_the_tight_boxes_of_a_brute_force_scan():
    generator = torch.Generator().manual_seed(1)
    masks = torch.rand(6, 40, 50, generator=generator) ** 8  # sparse pixels above 0.5
    masks[2] = 0  # empty: keeps its box
    boxes = torch.rand(6, 4, generator=generator)
    tight = mask_boxes(masks, boxes)
    for i, mask in enumerate(masks):
        ys, xs = (mask > 0.5).nonzero(as_tuple=True)
        expected = boxes[i] if len(ys) == 0 else torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1.0])
        assert torch.equal(tight[i], expected)


def test_maskness_is_the_mean_probability_above_the_threshold():
    generator = torch.Generator().manual_seed(2)
    masks = torch.rand(5, 16, 16, generator=generator)
    masks[3] = 0.2
    expected = torch.tensor([m[m > 0.5].mean().item() if (m > 0.5).any() else 0.0 for m in masks])
    torch.testing.assert_close(maskness(masks), expected)


@pytest.mark.parametrize("options", [{"p2_level": False, "fpn_channels": 256}, {}, {"fpn_channels": 64}],
                         ids=["P3-P7, 256 channels", "defaults: P2-P7, 128 channels", "P2-P7, 64 channels"])
def test_fcos_assign_matches_torchvision_fcos(options):
    """torchvision's FCOS computes the same assignment inside its loss; capture it from the head's loss call."""
    torch.manual_seed(0)
    model = build_detector("sprnet_fcos_resnet18_fpn", 4, min_size=128, max_size=128, **options).train()
    captured = []
    head_loss = model.head.compute_loss
    model.head.compute_loss = lambda targets, outputs, anchors, matched: captured.append(matched) or head_loss(
        targets, outputs, anchors, matched)
    generator = torch.Generator().manual_seed(3)
    boxes = [_random_boxes(7, 128, 128, generator), _random_boxes(1, 128, 128, generator), torch.zeros(0, 4)]
    targets = [box_target(b.tolist(), [1 + i % 3 for i in range(len(b))], (128, 128)) for b in boxes]
    images = [torch.rand(3, 128, 128) for _ in boxes]
    transformed, transformed_targets = model.transform(images, targets)
    features = list(model.backbone(transformed.tensors).values())
    outputs = model.head(features)
    anchors = model.anchor_generator(transformed, features)
    counts = [f.shape[-2] * f.shape[-1] for f in features]
    FCOS.compute_loss(model, transformed_targets, outputs, anchors, counts)
    (theirs,) = captured
    for target, image_anchors, expected in zip(transformed_targets, anchors, theirs, strict=True):
        ours = fcos_assign(target["boxes"], image_anchors, counts, model.center_sampling_radius)
        assert torch.equal(ours, expected)
    assert (theirs[0] >= 0).sum() > 7 and (theirs[2] < 0).all()  # several locations per box; none without boxes


def _model_anchors(size: int) -> tuple[torch.Tensor, list[int]]:
    """(L, 4) the SPR-FCOS locations' squares of one ``size`` x ``size`` image, and the locations per level."""
    model = build_detector("sprnet_fcos_resnet18_fpn", 4, min_size=size, max_size=size)
    images = model.transform([torch.rand(3, size, size)])[0]
    features = list(model.backbone(images.tensors).values())
    return model.anchor_generator(images, features)[0], [f.shape[-2] * f.shape[-1] for f in features]


def _assign_by_loops(boxes: torch.Tensor, masks: torch.Tensor, anchors: torch.Tensor, counts: list[int],
                     radius: float) -> torch.Tensor:
    """Mask-centre FCOS assignment one location and one object at a time, from its definition."""
    levels = [level for level, count in enumerate(counts) for _ in range(count)]
    centres = []
    for mask in masks:
        ys, xs = mask.nonzero(as_tuple=True)
        centres.append((xs.float().mean().item() + 0.5, ys.float().mean().item() + 0.5) if len(xs) else (0.0, 0.0))

    def candidates(rule: str) -> list[list[bool]]:
        table = []
        for (ax0, ay0, ax1, ay1), level in zip(anchors.tolist(), levels, strict=True):
            x, y, stride = (ax0 + ax1) / 2, (ay0 + ay1) / 2, ax1 - ax0
            row = []
            for g, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
                sides = (x - x0, y - y0, x1 - x, y1 - y)
                floor = 0 if level == 0 else 4 * stride
                ceiling = float("inf") if level == len(counts) - 1 else 8 * stride
                ok = min(sides) > 0 and floor < max(sides) < ceiling
                px, py = int(x // 1), int(y // 1)
                on_pixel = 0 <= px < masks.shape[2] and 0 <= py < masks.shape[1] and bool(masks[g, py, px])
                centre = {"mass centre": centres[g], "pixels": None, "box centre": ((x0 + x1) / 2, (y0 + y1) / 2)}[rule]
                if rule != "box centre":
                    ok = ok and on_pixel
                if centre is not None:
                    ok = ok and max(abs(x - centre[0]), abs(y - centre[1])) < radius * stride
                row.append(ok)
            table.append(row)
        return table

    # per object, the first rule that gives it a candidate: near its mass centre, on its pixels, near its box centre
    rules = [candidates("mass centre"), candidates("pixels"), candidates("box centre")]
    rule = [next((r for r in rules if any(row[g] for row in r)), rules[-1]) for g in range(len(boxes))]
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).tolist()
    matched = []
    for location in range(len(anchors)):
        chosen = [g for g in range(len(boxes)) if rule[g][location][g]]
        matched.append(min(chosen, key=lambda g: areas[g]) if chosen else -1)
    return torch.tensor(matched)


def test_mask_centre_assignment_matches_loops_over_locations():
    """Random blobs inside random boxes, one object with no visible pixel (it keeps its box-centre candidates), one
    strip far from its box's centre, and one ring (no pixel near its mass centre: its pixels at any distance)."""
    generator = torch.Generator().manual_seed(5)
    anchors, counts = _model_anchors(64)
    boxes = _random_boxes(6, 64, 64, generator, smallest=6).clamp(max=64)
    masks = torch.zeros(6, 64, 64, dtype=torch.uint8)
    for g, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        masks[g, y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0, generator=generator) > 0.4
    masks[2] = 0
    x0, y0, x1, y1 = boxes[4].round().long().tolist()
    masks[4] = 0
    masks[4, y0:y0 + 3, x0:x1] = 1  # a strip along the top: its mass centre is far from the box centre
    boxes[5] = torch.tensor([4.0, 4.0, 60.0, 60.0])
    masks[5] = 0
    masks[5, 4:60, 4:60] = 1
    masks[5, 12:52, 12:52] = 0  # a ring
    ours = fcos_assign(boxes, anchors, counts, 1.5, masks)
    assert torch.equal(ours, _assign_by_loops(boxes, masks, anchors, counts, 1.5))
    assert torch.equal(ours == 2, fcos_assign(boxes[2:3], anchors, counts, 1.5) == 0)  # the fallback, alone
    assert (ours == 4).any() and not torch.equal(ours == 4, fcos_assign(boxes[4:5], anchors, counts, 1.5) == 0)
    ring = fcos_assign(boxes[5:], anchors, counts, 1.5, masks[5:]) == 0
    points = ((anchors[ring, :2] + anchors[ring, 2:]) / 2).floor().long()
    assert ring.sum() > 4 and masks[5, points[:, 1], points[:, 0]].all()


def test_an_occluded_objects_positives_lie_on_its_own_pixels():
    """A square whose centre a smaller square covers from one side: box-centre sampling gives some of its positives
    the occluder's pixels, mask-centre sampling none, and the occluder's own positives do not change."""
    anchors, counts = _model_anchors(96)
    boxes = torch.tensor([[10.0, 10.0, 70.0, 70.0], [30.0, 30.0, 50.0, 70.0]])
    masks = torch.zeros(2, 96, 96, dtype=torch.uint8)
    masks[0, 10:70, 10:70] = 1
    masks[0, 30:70, 30:50] = 0
    masks[1, 30:70, 30:50] = 1
    points = ((anchors[:, :2] + anchors[:, 2:]) / 2).floor().long()

    def on_occluder(matched: torch.Tensor) -> int:
        location = (matched == 0).nonzero().flatten()
        return int(masks[1, points[location, 1], points[location, 0]].sum())

    by_box, by_mask = fcos_assign(boxes, anchors, counts), fcos_assign(boxes, anchors, counts, masks=masks)
    assert on_occluder(by_box) > 0
    assert (by_mask == 0).sum() > 0 and on_occluder(by_mask) == 0
    assert torch.equal(by_mask == 1, by_box == 1)


@pytest.mark.parametrize("options", [{}, {"mask_centre_sampling": False}], ids=["default: mask centres", "box centres"])
def test_fcos_loss_trains_on_the_chosen_assignment(options):
    """The option reaches the loss, on by default: torchvision's head gets the mask-centre assignment, or with the
    option off FCOS's own box-centre one."""
    torch.manual_seed(0)
    model = build_detector("sprnet_fcos_resnet18_fpn", 3, min_size=64, max_size=64, **options)
    captured = []
    head_loss = model.head.compute_loss
    model.head.compute_loss = lambda targets, outputs, anchors, matched: captured.append(matched) or head_loss(
        targets, outputs, anchors, matched)
    target = box_target([[8, 10, 40, 44], [20, 20, 60, 60]], [1, 2], (64, 64))
    target["masks"][1, 20:45, 20:45] = 0  # the second box's upper-left part is hidden
    losses = model.train()([torch.rand(3, 64, 64)], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    anchors, counts = _model_anchors(64)
    by_mask = fcos_assign(target["boxes"], anchors, counts, model.center_sampling_radius, target["masks"])
    by_box = fcos_assign(target["boxes"], anchors, counts, model.center_sampling_radius)
    assert not torch.equal(by_mask, by_box)
    assert torch.equal(captured[0][0], by_box if options else by_mask)


def _trained_a_little(name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_detector(name, 3, min_size=64, max_size=64, score_thresh=0.0, mask_score_thresh=0.0, **options)
    target = box_target([[8, 10, 40, 44], [36, 30, 60, 60]], [1, 2], (64, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = sum(model.train()([torch.rand(3, 64, 64)], [target]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("name", ["sprnet_resnet18_fpn", "sprnet_fcos_resnet18_fpn"])
def test_mask_score_thresh_decodes_only_the_detections_above_it(name):
    model = _trained_a_little(name)
    image = torch.rand(3, 64, 64)
    decoded = []
    model.mask_head.register_forward_hook(lambda module, args, out: decoded.append(len(out)))
    with torch.no_grad():
        everything = model([image])[0]
        model.mask_score_thresh = everything["scores"].median().item()
        capped = model([image])[0]
    kept = everything["scores"] >= model.mask_score_thresh
    assert decoded == [len(everything["scores"]), int(kept.sum())] and 0 < kept.sum() < len(kept)
    for key in ("boxes", "scores", "labels", "masks"):
        torch.testing.assert_close(capped[key], everything[key][kept])


def test_mask_scoring_and_box_refinement_rescore_and_tighten_from_the_masks():
    model = _trained_a_little("sprnet_fcos_resnet18_fpn")
    logits = _recording_mask_logits(model)
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        plain = model([image])[0]
        model.mask_scoring = model.refine_boxes = True
        refined = model([image])[0]
    box_frame = logits[0][torch.arange(len(plain["labels"])), plain["labels"]].sigmoid()
    torch.testing.assert_close(refined["scores"], plain["scores"] * maskness(box_frame))
    torch.testing.assert_close(refined["boxes"], mask_boxes(plain["masks"][:, 0], plain["boxes"]))
    torch.testing.assert_close(refined["masks"], plain["masks"])


def test_class_agnostic_finer_and_less_dilated_masks_train_and_detect():
    model = _trained_a_little("sprnet_fcos_resnet18_fpn", class_agnostic_masks=True, mask_size=64,
                              mask_dilations=(1, 2, 3))
    assert model.mask_head.logits.out_channels == 1 and model.mask_head.mask_size == 64
    assert [conv.dilation[0] for conv in model.mask_head.dilated] == [1, 2, 3]
    shapes = []
    model.mask_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape[1:])))
    with torch.no_grad():
        detection = model([torch.rand(3, 64, 64)])[0]
    assert shapes == [(1, 64, 64)] and detection["masks"].shape == (len(detection["boxes"]), 1, 64, 64)
    with pytest.raises(ValueError, match="mask_size must be a power of two"):
        build_detector("sprnet_resnet18_fpn", 3, mask_size=48)


@pytest.mark.parametrize(("name", "options"), [("sprnet_resnet18_fpn", {"mask_fg_iou_thresh": 0.3}),
                                               ("sprnet_fcos_resnet18_fpn", {})])
def test_mask_loss_samples_distinct_positives_down_to_the_budget_per_image(name, options):
    torch.manual_seed(0)
    model = build_detector(name, 3, min_size=64, max_size=64, **options).train()
    targets = [box_target([[8, 10, 40, 44], [36, 30, 60, 60]], [1, 2], (64, 64))] * 2
    decoded = []
    model.mask_head.register_forward_hook(lambda module, args, out: decoded.append(args[1:]))

    def positives_per_image(budget: int) -> list[list[int]]:
        model.mask_positives_per_image = budget
        decoded.clear()
        model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets)
        images, locations = decoded[0]
        return [locations[images == i].tolist() for i in range(2)]

    every = positives_per_image(10_000)
    assert all(len(p) == len(set(p)) > 3 for p in every)
    for sampled, full in zip(positives_per_image(3), every, strict=True):
        assert len(set(sampled)) == 3 and set(sampled) <= set(full)  # 3 distinct, each a real positive


def test_softplus_distances_are_the_same_conv_with_softplus_on_its_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1)
    soft = SoftplusConv2d.like(conv)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(soft(x), torch.nn.functional.softplus(conv(x)))
    assert soft.state_dict().keys() == conv.state_dict().keys()  # checkpoints keep their keys
    soft(x).sum().backward()  # every output has a gradient, where ReLU's would be zero below 0
    assert (soft.bias.grad.abs() > 0).all()


def test_p2_level_gives_small_objects_stride_4_locations_and_trains_and_detects():
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(1, 3, 128, 128, generator=generator)
    small = torch.tensor([[17.0, 17.0, 23.0, 23.0]])  # 6 px; locations sit at multiples of the stride: 16, 24 ...
    positives = {}
    for p2 in (False, True):
        model = build_detector("sprnet_fcos_resnet18_fpn", 3, min_size=128, max_size=128, p2_level=p2)
        features = list(model.backbone(images).values())
        assert [128 // f.shape[-1] for f in features] == [4, 8, 16, 32, 64, 128][0 if p2 else 1:]
        anchors = model.anchor_generator(model.transform(list(images))[0], features)[0]
        counts = [f.shape[-2] * f.shape[-1] for f in features]
        assert torch.equal(anchors[: counts[0]][:, 2] - anchors[: counts[0]][:, 0],
                           torch.full((counts[0],), 4.0 if p2 else 8.0))
        positives[p2] = int((fcos_assign(small, anchors, counts) >= 0).sum())
    assert positives == {False: 0, True: 1}  # (20, 20) on P2; none of P3's is inside the box
    model = _trained_a_little("sprnet_fcos_resnet18_fpn", p2_level=True)
    with torch.no_grad():
        detection = model([torch.rand(3, 64, 64)])[0]
    assert len(detection["boxes"]) and detection["masks"].shape == (len(detection["boxes"]), 1, 64, 64)


def test_fpn_channels_set_the_width_of_every_map_tower_and_mask_input_and_the_model_trains_and_detects():
    model = _trained_a_little("sprnet_fcos_resnet18_fpn", p2_level=True, fpn_channels=64, local_mask_features=True)
    with torch.no_grad():
        features = list(model.backbone(torch.rand(1, 3, 64, 64)).values())
        detection = model([torch.rand(3, 64, 64)])[0]
    assert [f.shape[1] for f in features] == [64] * 6  # P2-P7
    towers = [m for m in model.head.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.in_channels == 64 for conv in towers)
    assert model.mask_head.point.in_channels == model.local_mask.conv.in_channels == 64
    assert len(detection["boxes"]) and detection["masks"].shape == (len(detection["boxes"]), 1, 64, 64)
    with pytest.raises(EffdlError, match="fpn_channels must be a positive multiple of 32"):
        build_detector("sprnet_fcos_resnet18_fpn", 3, fpn_channels=100)
