"""Detection targets for tests: boxes with their filled-rectangle masks, in torchvision's target format."""

import torch


def box_target(boxes: list[list[float]], labels: list[int], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    masks = torch.zeros(len(boxes), *size, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
        m[int(y0):int(y1), int(x0):int(x1)] = 1
    return {"boxes": torch.tensor(boxes, dtype=torch.float).reshape(-1, 4), "labels": torch.tensor(labels).long(),
            "masks": masks}
