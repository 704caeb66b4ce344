import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from models.matcher import HungarianMatcher
from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

from conftest import load_golden


def _random_boxes(n, generator):
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], dim=1)


def _outputs(bs, q, c, generator):
    return {"pred_logits": torch.randn(bs, q, c + 1, generator=generator),
            "pred_boxes": _random_boxes(bs * q, generator).view(bs, q, 4)}


def test_golden_indices():
    g = load_golden("tiny_detr.pth")
    m = g["matcher"]
    matcher = HungarianMatcher(m["cost_class"], m["cost_bbox"], m["cost_giou"])
    indices = matcher(g["outputs"], g["targets"])
    for (i, j), (gi, gj) in zip(indices, m["indices"]):
        assert torch.equal(i, gi) and torch.equal(j, gj)
        assert i.dtype == torch.int64 and j.dtype == torch.int64


def test_empty_targets():
    gen = torch.Generator().manual_seed(0)
    outputs = _outputs(2, 6, 3, gen)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    one = {"labels": torch.tensor([1]), "boxes": _random_boxes(1, gen)}
    indices = HungarianMatcher(1, 5, 2)(outputs, [empty, one])
    assert len(indices[0][0]) == 0 and len(indices[0][1]) == 0
    assert len(indices[1][0]) == 1 and indices[1][1].tolist() == [0]
    indices = HungarianMatcher(1, 5, 2)(outputs, [empty, empty])
    assert all(len(i) == 0 and len(j) == 0 for i, j in indices)


def test_same_image_repeated_in_batch_matches_the_same():
    gen = torch.Generator().manual_seed(1)
    single = _outputs(1, 10, 4, gen)
    target = {"labels": torch.tensor([0, 3, 2]), "boxes": _random_boxes(3, gen)}
    alone = HungarianMatcher(1, 5, 2)(single, [target])
    batched = {k: v.repeat(3, 1, 1) for k, v in single.items()}
    together = HungarianMatcher(1, 5, 2)(batched, [target] * 3)
    for i, j in together:
        assert torch.equal(i, alone[0][0]) and torch.equal(j, alone[0][1])


def test_100x50_matches_scipy_on_the_full_cost_matrix():
    gen = torch.Generator().manual_seed(2)
    outputs = _outputs(1, 100, 10, gen)
    target = {"labels": torch.randint(0, 10, (50,), generator=gen), "boxes": _random_boxes(50, gen)}
    (i, j), = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)(outputs, [target])

    # the cost written out independently, in float64
    prob = outputs["pred_logits"][0].double().softmax(-1)
    pb, tb = outputs["pred_boxes"][0].double(), target["boxes"].double()
    l1 = (pb[:, None, :] - tb[None, :, :]).abs().sum(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(tb))
    cost = (5 * l1 - prob[:, target["labels"]] - 2 * giou).numpy()
    ri, rj = linear_sum_assignment(cost)
    assert len(i) == 50
    assert np.array_equal(i.numpy(), ri) and np.array_equal(j.numpy(), rj)
    assert np.isclose(cost[i.numpy(), j.numpy()].sum(), cost[ri, rj].sum())


def test_non_finite_predictions_do_not_crash_the_matcher():
    gen = torch.Generator().manual_seed(3)
    outputs = _outputs(1, 4, 2, gen)
    outputs["pred_logits"][0, 0] = float("nan")
    outputs["pred_boxes"][0, 1] = float("nan")
    target = {"labels": torch.tensor([1]), "boxes": _random_boxes(1, gen)}
    (i, j), = HungarianMatcher(1, 5, 2)(outputs, [target])
    assert len(i) == 1
