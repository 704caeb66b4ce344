"""Box utilities.

Boxes are ``[N, 4]`` tensors either in ``(cx, cy, w, h)`` or in ``(x0, y0, x1, y1)`` form. The heavy lifting
is done by ``torchvision.ops``; this module keeps the original DETR names (and ``box_iou``'s
``(iou, union)`` return value) so users' scripts keep working.
"""
import torch
from torch import Tensor
from torchvision.ops import box_area, box_convert
from torchvision.ops import generalized_box_iou as _tv_generalized_box_iou
from torchvision.ops import masks_to_boxes as _tv_masks_to_boxes

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_iou", "generalized_box_iou", "masks_to_boxes"]


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    return box_convert(x, in_fmt="cxcywh", out_fmt="xyxy")


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    return box_convert(x, in_fmt="xyxy", out_fmt="cxcywh")


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes. Returns ``(iou, union)``, both ``[N, M]``, as the original did."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def _check_xyxy(boxes: Tensor, name: str) -> None:
    # NaN rows pass: they come from a diverged step, which the training loop reports and skips
    degenerate = (boxes[:, 2:] < boxes[:, :2]).any(dim=1)
    if bool(degenerate.any()):
        bad = degenerate.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"generalized_box_iou: {name} has degenerate boxes (x1 < x0 or y1 < y0) at rows {bad}, "
            f"e.g. {boxes[bad[0]].tolist()}; expected xyxy boxes with non-negative width and height"
        )


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes, ``[N, M]``.

    Degenerate boxes would give inf / nan, so they are rejected with a clear error.
    """
    _check_xyxy(boxes1, "boxes1")
    _check_xyxy(boxes2, "boxes2")
    return _tv_generalized_box_iou(boxes1, boxes2)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """xyxy boxes ``[N, 4]`` around the non-zero pixels of masks ``[N, H, W]`` (max pixel index inclusive)."""
    if masks.numel() == 0:
        return torch.zeros((0, 4), device=masks.device)
    return _tv_masks_to_boxes(masks)
