import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models import build_model
from models.segmentation import MaskHeadSmallConv, MHAttentionMap, PostProcessPanoptic, PostProcessSegm

from conftest import load_golden, tiny_args

ATOL = 1e-4


def _heads(s):
    attention = MHAttentionMap(s["hidden_dim"], s["hidden_dim"], s["nheads"])
    attention.load_state_dict(s["bbox_attention"])
    head = MaskHeadSmallConv(s["hidden_dim"] + s["nheads"], s["fpn_dims"], s["hidden_dim"])
    head.load_state_dict(s["mask_head"])
    return attention, head


def test_golden_attention_map_and_mask_head():
    s = load_golden("segm_head.pth")
    attention, head = _heads(s)
    x = s["inputs"]
    with torch.no_grad():
        bbox_mask = attention(x["hs_last"], x["memory"], mask=x["mask"])
        torch.testing.assert_close(bbox_mask, s["bbox_mask"], atol=ATOL, rtol=0)
        seg = head(x["src_proj"], s["bbox_mask"], x["fpns"])
    torch.testing.assert_close(seg, s["seg_masks"], atol=ATOL, rtol=0)


def test_golden_postprocess_segm():
    s = load_golden("segm_head.pth")
    p = s["postprocess_segm"]
    results = PostProcessSegm(p["threshold"])([{}, {}], s["outputs"], p["target_sizes"], p["max_target_sizes"])
    for r, ref in zip(results, p["masks"]):
        assert r["masks"].dtype == torch.uint8
        assert torch.equal(r["masks"], ref)


def test_golden_postprocess_panoptic():
    s = load_golden("segm_head.pth")
    p = s["panoptic"]
    post = PostProcessPanoptic(p["is_thing_map"], threshold=p["threshold"], crop_padding=False)
    preds = post(s["outputs"], p["processed_sizes"], p["target_sizes"])
    for pred, ref in zip(preds, p["results"]):
        png = np.asarray(Image.open(io.BytesIO(pred["png_string"])).convert("RGB"))
        assert png.shape == tuple(ref["png"].shape)
        equal = (torch.from_numpy(png.copy()) == ref["png"]).all(-1).float().mean().item()
        assert equal >= 0.99
        assert pred["segments_info"] == ref["segments_info"]


def test_panoptic_png_of_a_padded_image_equals_the_image_alone():
    # the masks of a batch cover its padded size: an image smaller than the batch gets its own part of them
    torch.manual_seed(0)
    is_thing_map = {1: True, 2: True, 3: False}
    logits = torch.zeros(2, 4, 5)  # classes 0-3, no-object 4
    logits[:, torch.arange(4), torch.tensor([1, 2, 3, 4])] = 20.0  # queries: two things, a stuff, no-object
    masks = torch.randn(2, 4, 16, 24)
    batch = PostProcessPanoptic(is_thing_map, threshold=0.5)({"pred_logits": logits, "pred_masks": masks},
                                                            [(64, 96), (40, 72)])
    alone = PostProcessPanoptic(is_thing_map, threshold=0.5)(
        {"pred_logits": logits[1:], "pred_masks": F.interpolate(masks[1:], size=(64, 96), mode="bilinear",
                                                                 align_corners=False)[..., :40, :72]},
        [(40, 72)])
    png = [np.asarray(Image.open(io.BytesIO(p["png_string"])).convert("RGB")) for p in (batch[1], alone[0])]
    assert png[0].shape == (40, 72, 3)
    assert (png[0] == png[1]).all(-1).mean() > 0.97  # the same up to bilinear rounding at segment borders
    original = PostProcessPanoptic(is_thing_map, threshold=0.5, crop_padding=False)(
        {"pred_logits": logits, "pred_masks": masks}, [(64, 96), (40, 72)])
    stretched = np.asarray(Image.open(io.BytesIO(original[1]["png_string"])).convert("RGB"))
    assert (stretched == png[1]).all(-1).mean() < 0.9  # the original's stretched padding


def test_detrsegm_forward_and_frozen_detr():
    torch.manual_seed(0)
    model, criterion, post = build_model(tiny_args(masks=True, frozen_weights="x.pth", hidden_dim=128, nheads=8))
    assert set(post) == {"bbox", "segm"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("bbox_attention.", "mask_head.")) for n in trainable)
    out = model([torch.rand(3, 64, 96), torch.rand(3, 80, 64)])
    assert out["pred_masks"].shape == (2, 5, 20, 24)  # stride 4 of the padded 80x96 batch
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]),
                "masks": torch.zeros(1, 64, 96, dtype=torch.bool)},
               {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]]),
                "masks": torch.ones(2, 80, 64, dtype=torch.bool)}]
    losses = criterion(out, targets)
    assert {"loss_mask", "loss_dice"} <= set(losses) and "loss_mask_0" not in losses
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("last_layer", ["layer4", "layer3"])
def test_mask_head_reads_layer3_2_1_whatever_the_last_layer(last_layer):
    # with a backbone cut after layer3 (the synthetic recipes') the head adds layer3 at the transformer's own
    # resolution; its layout, and the 1/4-resolution masks, are those of the full backbone
    torch.manual_seed(0)
    args = tiny_args(masks=True, hidden_dim=128, nheads=8, backbone_last_layer=last_layer)
    model, _, _ = build_model(args)
    shapes = {n: tuple(p.shape) for n, p in model.mask_head.named_parameters()}
    assert shapes["adapter1.weight"][1] == 256 and shapes["adapter3.weight"][1] == 64  # resnet18's layer3, layer1
    out = model([torch.rand(3, 64, 96), torch.rand(3, 80, 64)])
    assert out["pred_masks"].shape == (2, 5, 20, 24)
    out["pred_masks"].sum().backward()
    assert model.mask_head.adapter1.weight.grad.abs().sum() > 0


def test_panoptic_postprocessor_with_nothing_kept():
    post = PostProcessPanoptic({0: True, 1: False}, threshold=0.99)
    outputs = {"pred_logits": torch.zeros(1, 3, 3), "pred_masks": torch.randn(1, 3, 8, 8),
               "pred_boxes": torch.rand(1, 3, 4)}
    (pred,) = post(outputs, [(16, 16)])
    assert pred["segments_info"] == []
    assert Image.open(io.BytesIO(pred["png_string"])).size == (16, 16)


def _postprocess_segm_all_at_once(results, outputs, orig_target_sizes, max_target_sizes, threshold=0.5):
    """The original's algorithm: the whole batch upsampled to the padded size at once."""
    max_h, max_w = max_target_sizes.max(0)[0].tolist()
    masks = F.interpolate(outputs["pred_masks"].squeeze(2), size=(max_h, max_w), mode="bilinear",
                          align_corners=False)
    masks = (masks.sigmoid() > threshold).cpu()
    for i, (cur, t, tt) in enumerate(zip(masks, max_target_sizes, orig_target_sizes)):
        cur = cur[:, :t[0], :t[1]].unsqueeze(1)
        results[i]["masks"] = F.interpolate(cur.float(), size=tuple(tt.tolist()), mode="nearest").byte()
    return results


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_postprocess_segm_chunks_give_the_same_masks(chunk_size):
    torch.manual_seed(chunk_size)
    outputs = {"pred_masks": torch.randn(3, 7, 25, 34) * 3}
    max_target_sizes = torch.tensor([[100, 133], [97, 120], [64, 136]])
    orig_target_sizes = torch.tensor([[480, 640], [300, 371], [200, 425]])
    expected = _postprocess_segm_all_at_once([{}, {}, {}], outputs, orig_target_sizes, max_target_sizes)
    results = PostProcessSegm(chunk_size=chunk_size)([{}, {}, {}], outputs, orig_target_sizes, max_target_sizes)
    for r, e in zip(results, expected):
        assert r["masks"].dtype == torch.uint8 and r["masks"].shape == e["masks"].shape
        assert torch.equal(r["masks"], e["masks"])


def test_postprocess_segm_score_threshold_keeps_fields_aligned():
    torch.manual_seed(0)
    outputs = {"pred_masks": torch.randn(2, 6, 10, 12)}
    sizes = torch.tensor([[40, 48], [36, 48]])
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.95, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    make = lambda: [{"scores": s.clone(), "labels": torch.arange(6), "boxes": torch.rand(6, 4)} for s in scores]  # noqa: E731
    everything = PostProcessSegm()(make(), outputs, sizes, sizes)
    kept = PostProcessSegm(score_threshold=0.5)(make(), outputs, sizes, sizes)
    assert kept[0]["labels"].tolist() == [0, 2, 4] and kept[1]["labels"].tolist() == [5]
    for k, e in zip(kept, everything):
        index = k["labels"]
        assert len(k["scores"]) == len(k["boxes"]) == len(k["masks"]) == len(index)
        assert torch.equal(k["masks"], e["masks"][index]) and torch.equal(k["scores"], e["scores"][index])


def test_panoptic_postprocessor_drops_classes_outside_the_thing_map():
    # class 1 is no category of the dataset (only 0 and 2 are): its confident query must not reach the PNG
    logits = torch.full((1, 2, 4), -10.0)
    logits[0, 0, 1] = 10.0
    logits[0, 1, 2] = 10.0
    masks = torch.full((1, 2, 8, 8), -5.0)
    masks[0, 0, :, :4] = 5.0
    masks[0, 1, :, 4:] = 5.0
    (pred,) = PostProcessPanoptic({0: True, 2: False})({"pred_logits": logits, "pred_masks": masks}, [(8, 8)])
    assert [s["category_id"] for s in pred["segments_info"]] == [2]
