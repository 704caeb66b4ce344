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


def test_all_decoder_layers_matched_with_one_host_transfer(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    layers = [_outputs(2, 7, 4, gen) for _ in range(3)]
    targets = [{"labels": torch.tensor([1, 3]), "boxes": _random_boxes(2, gen)},
               {"labels": torch.tensor([0, 2, 4]), "boxes": _random_boxes(3, gen)}]
    matcher = HungarianMatcher(1, 5, 2)
    one_by_one = [matcher(o, targets) for o in layers]
    transfers = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *a, **k):
        transfers.append(tuple(self.shape))
        return real_cpu(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    together = matcher.match_layers(layers, targets)
    assert transfers == [(3, 2, 7, 5)]  # [layers, batch, queries, all targets]
    for a, b in zip(one_by_one, together):
        for (i, j), (bi, bj) in zip(a, b):
            assert torch.equal(i, bi) and torch.equal(j, bj)


def test_costs_are_fp32_under_autocast(monkeypatch):
    import models.matcher

    gen = torch.Generator().manual_seed(4)
    outputs = {k: v.to(torch.bfloat16) for k, v in _outputs(2, 6, 3, gen).items()}
    targets = [{"labels": torch.tensor([1]), "boxes": _random_boxes(1, gen)},
               {"labels": torch.tensor([2, 0]), "boxes": _random_boxes(2, gen)}]
    seen = []
    real_giou = models.matcher.generalized_box_iou

    def spy(a, b):
        out = real_giou(a, b)
        seen.append((a.dtype, b.dtype, out.dtype))
        return out

    monkeypatch.setattr(models.matcher, "generalized_box_iou", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        HungarianMatcher(1, 5, 2)(outputs, targets)
    assert seen == [(torch.float32, torch.float32, torch.float32)]
