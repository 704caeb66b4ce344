import io

import numpy as np
import torch
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
    post = PostProcessPanoptic(p["is_thing_map"], threshold=p["threshold"])
    preds = post(s["outputs"], p["processed_sizes"], p["target_sizes"])
    for pred, ref in zip(preds, p["results"]):
        png = np.asarray(Image.open(io.BytesIO(pred["png_string"])).convert("RGB"))
        assert png.shape == tuple(ref["png"].shape)
        equal = (torch.from_numpy(png.copy()) == ref["png"]).all(-1).float().mean().item()
        assert equal >= 0.99
        assert pred["segments_info"] == ref["segments_info"]


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


def test_panoptic_postprocessor_with_nothing_kept():
    post = PostProcessPanoptic({0: True, 1: False}, threshold=0.99)
    outputs = {"pred_logits": torch.zeros(1, 3, 3), "pred_masks": torch.randn(1, 3, 8, 8),
               "pred_boxes": torch.rand(1, 3, 4)}
    (pred,) = post(outputs, [(16, 16)])
    assert pred["segments_info"] == []
    assert Image.open(io.BytesIO(pred["png_string"])).size == (16, 16)
