import pytest
import torch

from models import build_model
from models.detr import SetCriterion, build_weight_dict
from models.matcher import HungarianMatcher

from conftest import load_golden, make_args, tiny_args


def _golden():
    g = load_golden("tiny_detr.pth")
    model, criterion, _ = build_model(make_args(**g["config"]))
    model.load_state_dict(g["checkpoint"]["model"], strict=True)
    model.eval()  # the golden gradients were computed in eval mode (no dropout)
    return g, model, criterion


def test_weight_dict_is_the_originals():
    g = load_golden("tiny_detr.pth")
    assert build_weight_dict(make_args(**g["config"])) == g["criterion"]["weight_dict"]
    wd = build_weight_dict(make_args(dec_layers=6, masks=True))
    assert wd["loss_bbox_4"] == 5 and wd["loss_mask_4"] == 1 and "loss_ce_5" not in wd


def test_golden_losses_total_and_gradients():
    g, model, criterion = _golden()
    assert criterion.eos_coef == g["criterion"]["eos_coef"]
    losses = criterion(model(g["images"]), g["targets"])
    ref = g["criterion"]["losses"]
    assert set(ref) <= set(losses)
    for k, v in ref.items():
        assert losses[k].item() == pytest.approx(v, rel=1e-5, abs=1e-4), k
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    assert total.item() == pytest.approx(g["total_loss"], rel=1e-5, abs=1e-4)
    total.backward()
    params = dict(model.named_parameters())
    for name, ref_grad in g["grads"].items():
        torch.testing.assert_close(params[name].grad, ref_grad, rtol=1e-3, atol=1e-3 * ref_grad.abs().max().item())


def test_golden_mask_losses():
    s = load_golden("segm_head.pth")
    weight_dict = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2, "loss_mask": 1, "loss_dice": 1}
    criterion = SetCriterion(5, HungarianMatcher(1, 5, 2), weight_dict, 0.1,
                             ["labels", "boxes", "cardinality", "masks"])
    losses = criterion(s["outputs"], s["targets"])
    for k, v in s["losses"].items():
        assert losses[k].item() == pytest.approx(v, rel=1e-5, abs=1e-4), k


def _tiny_criterion(num_classes=4):
    return SetCriterion(num_classes, HungarianMatcher(1, 5, 2), {"loss_ce": 1}, 0.1, ["labels", "boxes"])


def _outputs(q=5, c=4):
    gen = torch.Generator().manual_seed(0)
    return {"pred_logits": torch.randn(1, q, c + 1, generator=gen),
            "pred_boxes": torch.rand(1, q, 4, generator=gen) * 0.4 + 0.1}


def test_empty_targets_give_finite_losses():
    losses = _tiny_criterion()(_outputs(), [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0


def test_class_id_out_of_range_is_a_clear_error():
    target = {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2),
              "image_id": torch.tensor(17)}
    with pytest.raises(ValueError, match=r"target 0 \(image_id 17\) has class id 4, outside \[0, 4\).*--num_classes"):
        _tiny_criterion()(_outputs(), [target])


def test_degenerate_target_box_is_a_clear_error():
    target = {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.0, 0.1]])}
    with pytest.raises(ValueError, match=r"target 0 box 1 has non-positive width/height"):
        _tiny_criterion()(_outputs(), [target])


def test_no_object_is_down_weighted():
    criterion = _tiny_criterion()
    assert criterion.empty_weight.tolist() == [1, 1, 1, 1, pytest.approx(0.1)]
    model, criterion, _ = build_model(tiny_args(eos_coef=0.25))
    assert criterion.empty_weight[-1].item() == pytest.approx(0.25)


def _accumulation_batch(counts=(0, 2, 6, 1, 3, 1)):
    """Outputs of 6 images (5 queries, 2 decoder layers) and their targets: counts of objects per image, one image
    with more objects than queries."""
    gen = torch.Generator().manual_seed(1)
    n, q, c = len(counts), 5, 4
    layers = [{"pred_logits": torch.randn(n, q, c + 1, generator=gen),
               "pred_boxes": torch.rand(n, q, 4, generator=gen) * 0.4 + 0.3} for _ in range(2)]
    outputs = dict(layers[-1], aux_outputs=layers[:-1])
    targets = [{"labels": torch.randint(0, c, (k,), generator=gen),
                "boxes": torch.cat([torch.rand(k, 2, generator=gen) * 0.4 + 0.3,
                                    torch.rand(k, 2, generator=gen) * 0.2 + 0.1], dim=1)} for k in counts]
    return outputs, targets


def _part(outputs, lo, hi):
    return {k: [_part(a, lo, hi) for a in v] if k == "aux_outputs" else v[lo:hi] for k, v in outputs.items()}


def test_micro_batch_losses_add_up_to_the_whole_batchs():
    """Gradient accumulation: with batch_targets, each micro-batch's losses (class loss of every decoder layer
    included) are its share of the whole batch's; without, each is its own mean and they do not add up."""
    criterion = SetCriterion(4, HungarianMatcher(1, 5, 2), {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}, 0.1,
                             ["labels", "boxes", "cardinality"])
    outputs, targets = _accumulation_batch()
    whole = criterion(outputs, targets)
    parts = [(_part(outputs, lo, hi), targets[lo:hi]) for lo, hi in ((0, 2), (2, 3), (3, 6))]
    shares = [criterion(o, t, batch_targets=targets) for o, t in parts]
    for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"):
        assert sum(s[k] for s in shares).item() == pytest.approx(whole[k].item(), rel=1e-6), k
    own = [criterion(o, t) for o, t in parts]
    assert abs(sum(s["loss_ce"] for s in own).item() / 3 - whole["loss_ce"].item()) > 1e-3
    # the class-weight normaliser known before matching is the one the weighted mean uses
    assert criterion.class_weight_sum(targets, 5) == pytest.approx(12 + 0.1 * (30 - 12))
    # a batch given as its own batch_targets: the same losses (today's path is the default)
    alone = criterion(outputs, targets, batch_targets=targets)
    for k, v in whole.items():
        assert alone[k].item() == pytest.approx(v.item(), rel=1e-6), k
