import pytest
import torch

from util.box_ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou, masks_to_boxes


def test_quarter_box_inside_has_iou_one_quarter():
    outer = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    inner = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    iou, union = box_iou(outer, inner)
    assert iou.item() == pytest.approx(0.25)
    assert union.item() == pytest.approx(16.0)
    # the enclosing box is the outer box itself, so GIoU == IoU
    assert generalized_box_iou(outer, inner).item() == pytest.approx(0.25)


def test_disjoint_boxes_giou_is_negative():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    # IoU 0, union 2, enclosing box 3x1 = 3: GIoU = 0 - (3 - 2) / 3
    assert box_iou(a, b)[0].item() == 0.0
    assert generalized_box_iou(a, b).item() == pytest.approx(-1 / 3)


def test_half_overlap():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 3.0, 2.0]])
    # intersection 2, union 6, enclosing 6
    assert box_iou(a, b)[0].item() == pytest.approx(1 / 3)
    assert generalized_box_iou(a, b).item() == pytest.approx(1 / 3)


def test_pairwise_shape_and_identity():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 2.0, 3.0], [1.0, 1.0, 2.0, 2.0]])
    giou = generalized_box_iou(boxes, boxes[:2])
    assert giou.shape == (3, 2)
    assert torch.allclose(torch.diagonal(giou[:2]), torch.ones(2))


def test_cxcywh_round_trip_and_known_values():
    cxcywh = torch.tensor([[0.5, 0.5, 1.0, 1.0], [2.0, 3.0, 2.0, 4.0]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert torch.equal(xyxy, torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 3.0, 5.0]]))
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), cxcywh)
    rand = torch.rand(50, 4)
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(rand)), rand, atol=1e-6)


def test_degenerate_boxes_are_rejected_with_a_clear_error():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"boxes2 has degenerate boxes .* rows \[1\]"):
        generalized_box_iou(good, bad)


def test_masks_to_boxes():
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True  # rows 2..4, cols 3..6
    masks[1, 0, 0] = True
    masks[1, 9, 11] = True
    boxes = masks_to_boxes(masks)
    assert torch.equal(boxes, torch.tensor([[3.0, 2.0, 6.0, 4.0], [0.0, 0.0, 11.0, 9.0]]))
    assert masks_to_boxes(torch.zeros(0, 4, 4)).shape == (0, 4)
