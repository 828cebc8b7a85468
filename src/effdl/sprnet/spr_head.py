"""The single-pixel-reconstruction (SPR) mask branch and its loss.

SPRNet predicts an instance mask from the feature vector of ONE location of
one FPN level: the location whose anchor produced the detection. Because the
mask needs only that location, nothing here runs densely: the multi-dilation
fusion convolutions are evaluated at the selected locations by gathering
their taps (``conv_at``), and the transposed-conv decoder runs on N vectors.

Legend: B images, L locations over all FPN levels (sum of H_l * W_l), A
anchors per location, G ground-truth boxes, N selected locations, C FPN
channels, K classes (label 0 = background, as in torchvision), M = 32 the
mask side.

Choices where the paper is silent (see ``shared/papers/sprnet.md``):
- each fusion branch ends in a ReLU before the concatenation;
- decoder widths: 640 -> 256 -> 128 -> 128 (1 -> 8 px, linear), 128 -> 64 ->
  64 (8 -> 32 px, ReLU), a 1x1 conv to K logits; the shortcut is a 1x1 conv
  of the 8x8 map to K logits, upsampled bilinearly and added. About 8.5 MMACs
  per mask, so decoding 100 detections costs less than a tenth of a ResNet-50
  forward at 512 px (wider 256-channel stages would cost 4x that);
- mask positives: a location is positive when its best anchor has IoU above
  ``fg_iou_thresh`` with a ground-truth box; in addition every ground-truth
  box claims its single best location (like torchvision's low-quality
  matches), so small objects that no anchor covers at 0.7 still train masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

MASK_SIZE = 32
DILATIONS = (2, 4, 6)  # the paper's fusion dilations


def location_coords(location: Tensor, level_sizes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """(level, y, x) of flat location indices, where locations are numbered level by level, row-major within one.

    This is torchvision's anchor order divided by A (anchors are laid out
    ``(level, y, x, a)``), so ``anchor_idx // A`` is a location index. Cost O(N * levels).
    """
    counts = torch.tensor([h * w for h, w in level_sizes], device=location.device)
    starts = torch.cumsum(counts, 0) - counts
    level = torch.searchsorted(torch.cumsum(counts, 0), location, right=True)  # (N,)
    within = location - starts[level]
    widths = torch.tensor([w for _, w in level_sizes], device=location.device)[level]
    return level, within // widths, within % widths


def conv_at(feature: Tensor, image: Tensor, y: Tensor, x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(feature)[image, :, y, x]`` at N points, without the dense convolution.

    Gathers each point's k x k taps (with the conv's dilation and zero padding)
    and contracts them with the weights: O(N * C_in * C_out * k^2) instead of
    O(B * H * W * C_in * C_out * k^2). ``conv`` must be a 'same'-padded, stride-1 conv.
    """
    k, d = conv.kernel_size[0], conv.dilation[0]
    r = d * (k // 2)
    padded = F.pad(feature, (r, r, r, r))  # (B, C, H + 2r, W + 2r)
    taps = torch.arange(k, device=feature.device) * d
    ys, xs = y[:, None] + taps, x[:, None] + taps  # (N, k) rows / columns in the padded map
    patch = padded[image[:, None, None], :, ys[:, :, None], xs[:, None, :]]  # (N, k, k, C)
    # reorder the small patch, not the weight, into the weight's (C, k, k) order
    patch = patch.permute(0, 3, 1, 2).reshape(len(patch), feature.shape[1] * k * k)  # (N, C * k * k)
    weight = conv.weight.reshape(conv.out_channels, -1)  # (C_out, C * k * k), a view
    return F.linear(patch, weight, conv.bias)  # (N, C_out)


def deconv2x2(rows: Tensor, deconv: nn.ConvTranspose2d, relu: bool = False) -> Tensor:
    """``deconv`` (a 2x2, stride-2 transposed conv), optionally followed by ReLU, on pixels as rows:
    (R, C) -> (4R, O), each input pixel's 2x2 output block as 4 consecutive rows in (dy, dx) order.

    The blocks of such a layer do not overlap, so each is its pixel's C-vector times the (C, 4 * O) weight: one
    GEMM with the bias fused, and a chain of these layers never needs to move a pixel (``blocks_to_map`` lays the
    rows out as an image once, at the end). Cost R * C * O * 4 MACs, the same as the conv; CPU ``conv_transpose2d``
    runs the 1x1 -> 2x2 case about 8x slower, and NCHW layers would copy the map twice per layer.
    """
    c, o = deconv.in_channels, deconv.out_channels
    if len(rows) < c:  # reorder the output blocks (o, dy, dx) -> (dy, dx, o) or the weight, whichever is smaller
        blocks = torch.addmm(deconv.bias.repeat_interleave(4), rows, deconv.weight.reshape(c, o * 4))
        blocks = blocks.view(-1, o, 4).transpose(1, 2).reshape(-1, o)
    else:
        weight = deconv.weight.permute(0, 2, 3, 1).reshape(c, 4 * o)
        blocks = torch.addmm(deconv.bias.repeat(4), rows, weight).view(-1, o)
    return blocks.relu_() if relu else blocks  # in place is safe: neither addmm's backward nor a view's needs it


def blocks_to_map(rows: Tensor, n: int, stages: int) -> Tensor:
    """The (n * 4**stages, C) rows of ``stages`` chained ``deconv2x2`` layers as maps (n, C, 2**stages, 2**stages).

    Row index digits, from the coarsest stage to the finest, are (dy_1, dx_1, ..., dy_s, dx_s); a pixel's row is
    dy_1 ... dy_s in binary and its column dx_1 ... dx_s. One copy. Cost O(rows * C).
    """
    c = rows.shape[-1]
    digits = rows.view(n, *(2, 2) * stages, c)
    order = (0, 2 * stages + 1, *range(1, 2 * stages, 2), *range(2, 2 * stages + 1, 2))
    return digits.permute(order).reshape(n, c, 2 ** stages, 2 ** stages)


class SPRMaskHead(nn.Module):
    """Location feature -> K-class M x M mask logits (weights shared across FPN levels).

    ``forward(features, image, location)`` decodes the masks of N locations;
    ``features`` are the FPN maps (B, C, H_l, W_l), ``image`` and ``location``
    are (N,) indices. Returns (N, K, M, M) logits; ``mask_size`` M is 16, 32,
    64 ... (each doubling past 32 adds one 64-channel deconv stage).
    """

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = DILATIONS,
                 mask_size: int = MASK_SIZE):
        super().__init__()
        stages = mask_size.bit_length() - 4  # 8 -> M px in 2x steps
        if mask_size < 16 or mask_size != 8 << stages:
            raise ValueError(f"mask_size must be a power of two >= 16, got {mask_size}")
        self.mask_size = mask_size
        self.point = nn.Conv2d(in_channels, 256, 1)
        self.dilated = nn.ModuleList(nn.Conv2d(in_channels, 128, 3, padding=d, dilation=d) for d in dilations)
        fused = 256 + 128 * len(dilations)
        # 1 -> 2 -> 4 -> 8 px; no activation: a learned linear "unprojection" of the vector
        self.reconstruct = nn.ModuleList(nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
                                         for c_in, c_out in ((fused, 256), (256, 128), (128, 128)))
        # 8 -> 16 -> ... -> M px, each followed by a ReLU
        self.refine = nn.ModuleList(nn.ConvTranspose2d(128 if i == 0 else 64, 64, 2, stride=2) for i in range(stages))
        self.logits = nn.Conv2d(64, num_classes, 1)
        self.shortcut = nn.Conv2d(128, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def fuse(self, features: Sequence[Tensor], image: Tensor, location: Tensor) -> Tensor:
        """The multi-dilation fusion vector of each location: (N, 256 + 128 * len(dilations))."""
        level, y, x = location_coords(location, [f.shape[-2:] for f in features])
        rows, vectors = [], []
        for lvl, feature in enumerate(features):
            at = (level == lvl).nonzero().flatten()
            if len(at) == 0 and len(location):  # skip a level without locations (unless none has any: an empty
                continue                           # call still reaches every weight, for its zero gradient)
            args = feature, image[at], y[at], x[at]
            rows.append(at)
            vectors.append(torch.cat([F.relu(conv_at(*args, conv)) for conv in (self.point, *self.dilated)], 1))
        return torch.cat(vectors)[torch.cat(rows).argsort()]  # back in the order of ``location``

    def forward(self, features: Sequence[Tensor], image: Tensor, location: Tensor) -> Tensor:
        n = len(location)
        coarse = self.fuse(features, image, location)  # (N, 640): one row per pixel from here on
        for deconv in self.reconstruct:
            coarse = deconv2x2(coarse, deconv)  # -> (N * 64, 128): 8 x 8 px
        fine = coarse
        for deconv in self.refine:
            fine = deconv2x2(fine, deconv, relu=True)  # -> (N * M^2, 64)
        stages = len(self.reconstruct) + len(self.refine)
        fine = blocks_to_map(F.linear(fine, self.logits.weight[:, :, 0, 0], self.logits.bias), n, stages)
        shortcut = F.linear(coarse, self.shortcut.weight[:, :, 0, 0], self.shortcut.bias)  # (N * 64, K)
        shortcut = blocks_to_map(shortcut, n, len(self.reconstruct))  # (N, K, 8, 8)
        return fine + F.interpolate(shortcut, size=fine.shape[-2:], mode="bilinear", align_corners=False)


def mask_positives(iou: Tensor, num_anchors: int, fg_iou_thresh: float = 0.7) -> tuple[Tensor, Tensor]:
    """Mask-training locations of one image and the ground-truth box each reconstructs.

    ``iou`` is (G, L * A) between ground-truth boxes and anchors. A location
    is positive when its best anchor's IoU with some box exceeds
    ``fg_iou_thresh``; every box also claims its best location (the mask loss
    samples them down to its budget). Returns (location, gt) index tensors of
    equal length. Cost O(G * L * A).
    """
    best_per_location, _ = iou.unflatten(1, (-1, num_anchors)).max(2)  # (G, L)
    best_iou, gt = best_per_location.max(0)  # (L,)
    positive = best_iou > fg_iou_thresh
    claimed = best_per_location.argmax(1)  # (G,) each box's best location
    gt[claimed] = torch.arange(len(claimed), device=iou.device)
    positive[claimed] = True
    location = positive.nonzero().flatten()
    return location, gt[location]


class LocalMaskLogits(nn.Module):
    """Per-class mask logits read from the finest FPN map inside each mask's frame, added to SPR's.

    SPR decodes a whole mask from one location's vector, which carries the object's shape but little of its outline
    on small objects (Mask R-CNN pools a 14 x 14 grid of features instead). This branch maps the finest FPN level
    (B, C, H, W) to K logit maps with one 3x3 conv (ReLU) and a 1x1 conv, run densely, then RoIAligns them into
    each frame: ``forward(feature, rois, spatial_scale, size)`` with ``rois`` (N, 5) (image index, xyxy in image
    pixels) returns (N, K, size, size). The 1x1 conv starts at zero, so the sum starts as plain SPR. Cost: the
    convs over H * W positions, O(H * W * C * 128 * 9), plus O(N * K * size^2) for the crops.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.logits = nn.Conv2d(hidden, num_classes, 1)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)

    def forward(self, feature: Tensor, rois: Tensor, spatial_scale: float, size: int) -> Tensor:
        maps = self.logits(F.relu(self.conv(feature)))  # (B, K, H, W)
        return roi_align(maps, rois, (size, size), spatial_scale, sampling_ratio=2, aligned=True)  # (N, K, M, M)


def mask_targets(masks: Tensor, boxes: Tensor, size: int = MASK_SIZE, owners: Tensor | None = None) -> Tensor:
    """Instance masks cropped to boxes and resized to size x size, as soft targets in [0, 1].

    ``masks`` (G, H, W) binary, ``boxes`` (N, 4) xyxy in the mask's pixels; box i crops mask ``owners[i]``
    (default: box i crops mask i, each instance in its own box). Uses RoIAlign on the box, pixel-aligned
    (``aligned=True``: target pixel j covers the box's j-th strip, the frame ``paste_masks`` pastes back into).
    Returns (N, size, size). Cost O(N * size^2).
    """
    if owners is None:
        owners = torch.arange(len(boxes), device=boxes.device)
    rois = torch.cat([owners.to(boxes.dtype)[:, None], boxes], 1)
    return roi_align(masks[:, None].to(boxes.dtype), rois, (size, size), 1.0, aligned=True)[:, 0]


def mask_frames(predicted: Tensor, truth: Tensor, min_iou: float = 0.5) -> Tensor:
    """The box each mask positive learns its mask in: its own predicted box where that overlaps its ground-truth
    box by at least ``min_iou``, else the ground-truth box.

    At inference a mask is pasted into the predicted box, so a mask learnt in that frame also corrects the box's
    error (Mask R-CNN's mask head learns in its proposals' frames for the same reason); early in training, when
    predictions are far off, the ground-truth frame keeps the targets meaningful. ``predicted`` and ``truth`` are
    (N, 4) xyxy, row-aligned. Cost O(N).
    """
    return torch.where((paired_box_iou(predicted, truth) >= min_iou)[:, None], predicted, truth)


def paired_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of row-aligned boxes: a[i] with b[i], both (N, 4) xyxy (a may be degenerate) -> (N,). Cost O(N), where
    ``torchvision.ops.box_iou`` computes all N x N pairs."""
    lo, hi = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(1)
    union = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1) + (b[:, 2:] - b[:, :2]).prod(1) - inter
    return inter / union.clamp(min=1e-6)


def scale_boxes(boxes: Tensor, factor: float) -> Tensor:
    """Boxes (N, 4) xyxy scaled by ``factor`` about their centres (1: unchanged). Cost O(N).

    A mask learnt and pasted in its box scaled by more than 1 covers what lies just outside the box too, so a box
    that cuts into its object no longer cuts the object's mask.
    """
    centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    return torch.cat([centre - half, centre + half], 1)


def spr_mask_loss(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy on each positive's ground-truth class channel only, averaged over pixels.

    ``logits`` (N, K, M, M), ``labels`` (N,), ``targets`` (N, M, M). With no
    positives the loss is a zero that still depends on ``logits`` (so every
    rank's graph has the same parameters in distributed training).
    """
    if len(labels) == 0:
        return logits.sum() * 0.0
    picked = logits[torch.arange(len(labels), device=labels.device), labels]  # (N, M, M)
    return F.binary_cross_entropy_with_logits(picked, targets)


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """Box-frame masks (N, M, M) resampled bilinearly into their boxes (N, 4) xyxy on a (height, width) canvas.

    What torchvision's ``paste_masks_in_image`` computes (outside its box a mask fades to zero over half a mask
    pixel, as with its one-pixel zero padding), without its per-mask Python loop: resampling in a box is separable,
    so each mask becomes ``Ry @ mask @ Rx^T`` with (height, M) and (width, M) interpolation matrices.
    Returns (N, height, width). Cost O(N * M * (height * M + height * width)).
    """
    size = masks.shape[-1]

    def weights(lo: Tensor, hi: Tensor, length: int) -> Tensor:  # (N, length, M) bilinear taps per output pixel
        centres = torch.arange(length, device=masks.device, dtype=masks.dtype) + 0.5
        source = (centres - lo[:, None]) / (hi - lo).clamp(min=1e-6)[:, None] * size - 0.5  # (N, length)
        taps = torch.arange(size, device=masks.device, dtype=masks.dtype)
        return (1 - (source[:, :, None] - taps).abs()).clamp(min=0)

    boxes = boxes.to(masks.dtype)
    rows, cols = weights(boxes[:, 1], boxes[:, 3], height), weights(boxes[:, 0], boxes[:, 2], width)
    return rows @ masks @ cols.transpose(1, 2)  # (N, H, M) @ (N, M, M) @ (N, M, W)


def mask_boxes(masks: Tensor, boxes: Tensor, threshold: float = 0.5) -> Tensor:
    """The tight xyxy box of each pasted mask's pixels above ``threshold``; ``boxes`` where a mask is empty.

    ``masks`` (N, H, W) probabilities on the image canvas. Cost O(N * H * W).
    """
    inside = masks > threshold
    rows, cols = inside.any(2), inside.any(1)  # (N, H), (N, W)
    empty = ~rows.any(1)

    def extent(filled: Tensor) -> tuple[Tensor, Tensor]:
        index = torch.arange(filled.shape[1], device=masks.device)
        first = torch.where(filled, index, filled.shape[1]).amin(1)
        last = torch.where(filled, index, -1).amax(1) + 1
        return first, last

    (y0, y1), (x0, x1) = extent(rows), extent(cols)
    tight = torch.stack([x0, y0, x1, y1], 1).to(boxes.dtype)
    return torch.where(empty[:, None], boxes, tight)


def maskness(masks: Tensor, threshold: float = 0.5) -> Tensor:
    """SOLO's mask quality: each mask's mean probability over its pixels above ``threshold`` (0 when none).

    ``masks`` (N, M, M) probabilities; a detection's score times its maskness ranks crisp masks above vague ones.
    Cost O(N * M^2).
    """
    inside = (masks > threshold).to(masks.dtype)
    return (masks * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1)
