"""datasets.coco_eval.CocoEvaluator gives exactly pycocotools' numbers on hand-made data."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets.coco_eval import CocoEvaluator

H, W = 40, 50


def _square(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _gt_dict():
    # three images, two categories (1, 3: a gap like COCO's), one crowd object, one image without objects
    gts = [  # (image_id, category_id, x, y, w, h, iscrowd)
        (1, 1, 2, 3, 10, 12, 0), (1, 3, 20, 5, 15, 20, 0), (1, 1, 30, 25, 12, 10, 0),
        (2, 3, 5, 5, 30, 30, 0), (2, 1, 0, 0, 8, 8, 1),
        (3, 1, 10, 10, 20, 15, 0),
    ]
    anns = [{"id": i + 1, "image_id": im, "category_id": c, "bbox": [x, y, w, h], "area": float(w * h),
             "iscrowd": crowd, "segmentation": _square(x, y, w, h)}
            for i, (im, c, x, y, w, h, crowd) in enumerate(gts)]
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in (1, 2, 3, 4)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "one", "supercategory": "s"},
                       {"id": 3, "name": "three", "supercategory": "s"}],
    }


@pytest.fixture()
def coco_gt(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_gt_dict()))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _detections():
    # image_id -> list of (category_id, x0, y0, x1, y1, score); boxes on a 0.25 grid so xyxy <-> xywh is exact
    return {
        1: [(1, 2, 3, 12, 15, 0.9), (3, 21, 5, 35, 24.5, 0.8), (1, 30, 25, 41, 36, 0.3),
            (3, 0, 0, 10, 10, 0.6)],
        2: [(3, 6, 4, 34.75, 35, 0.95), (1, 0, 0, 8, 8, 0.5), (1, 40, 30, 49, 39, 0.2)],
        3: [(1, 11, 11, 30, 25, 0.7), (3, 10, 10, 30, 25, 0.4)],
        4: [(1, 5, 5, 15, 15, 0.1)],
    }


def _mask(x0, y0, x1, y1):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = 1
    return mask


def _predictions(with_masks):
    predictions = {}
    for image_id, dets in _detections().items():
        pred = {
            "scores": torch.tensor([d[5] for d in dets], dtype=torch.float32),
            "labels": torch.tensor([d[0] for d in dets]),
            "boxes": torch.tensor([d[1:5] for d in dets], dtype=torch.float32),
        }
        if with_masks:
            # [N, 1, H, W] uint8, as PostProcessSegm returns them
            pred["masks"] = torch.stack([torch.from_numpy(_mask(*d[1:5]))[None] for d in dets])
        predictions[image_id] = pred
    return predictions


def _direct_stats(coco_gt, iou_type):
    """pycocotools on its own: the reference numbers."""
    results = []
    for image_id, dets in _detections().items():
        for c, x0, y0, x1, y1, score in dets:
            score = float(np.float32(score))  # the evaluator sees float32 scores
            if iou_type == "bbox":
                results.append({"image_id": image_id, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "score": score})
            else:
                rle = mask_util.encode(np.asfortranarray(_mask(x0, y0, x1, y1)))
                results.append({"image_id": image_id, "category_id": c, "segmentation": rle, "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType=iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats, coco_eval.eval["precision"]


def test_bbox_and_segm_equal_pycocotools(coco_gt, capsys):
    reference = {t: _direct_stats(coco_gt, t) for t in ("bbox", "segm")}
    evaluator = CocoEvaluator(coco_gt, ["bbox", "segm"])
    predictions = _predictions(with_masks=True)
    evaluator.update({k: predictions[k] for k in (1, 2)})  # in two batches, like the engine
    evaluator.update({k: predictions[k] for k in (3, 4)})
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    out = capsys.readouterr().out
    for iou_type, (stats, precision) in reference.items():
        coco_eval = evaluator.coco_eval[iou_type]
        assert np.array_equal(coco_eval.stats, stats), iou_type
        assert np.array_equal(coco_eval.eval["precision"], precision), iou_type
        assert 0 < stats[0] < 1  # a non-trivial case
    assert "IoU metric: bbox" in out and "IoU metric: segm" in out
    assert out.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]") == 2
    assert out.count("Average Recall") == 12
    assert "Loading and preparing results" not in out


def test_ground_truth_index_is_not_modified(coco_gt):
    before = json.dumps(coco_gt.dataset, sort_keys=True)
    evaluator = CocoEvaluator(coco_gt, ["segm"])
    evaluator.update(_predictions(with_masks=True))
    evaluator.accumulate()
    assert json.dumps(coco_gt.dataset, sort_keys=True) == before


def test_subset_of_images_is_scored_alone(coco_gt):
    # only the images that got predictions are evaluated, as in the original
    evaluator = CocoEvaluator(coco_gt, ["bbox"])
    evaluator.update({3: _predictions(with_masks=False)[3]})
    evaluator.accumulate()
    assert evaluator.coco_eval["bbox"].params.imgIds == [3]


def test_duplicate_images_keep_first_predictions(coco_gt):
    preds = _predictions(with_masks=False)
    evaluator = CocoEvaluator(coco_gt, ["bbox"])
    evaluator.update(preds)
    evaluator.update({1: preds[2]})  # a padded repeat must not add detections
    assert evaluator.img_ids == [1, 2, 3, 4]
    assert len(evaluator.results["bbox"][1]) == len(preds[1]["boxes"])


@pytest.mark.parametrize("updated", [True, False])
def test_empty_predictions_do_not_crash(coco_gt, updated, capsys):
    evaluator = CocoEvaluator(coco_gt, ["bbox", "segm"])
    if updated:
        empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                 "boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 1, H, W, dtype=torch.uint8)}
        evaluator.update({1: empty, 2: empty})
    evaluator.accumulate()
    evaluator.summarize()
    for coco_eval in evaluator.coco_eval.values():
        assert len(coco_eval.stats) == 12
        assert np.all(coco_eval.stats <= 0)  # 0 with ground truth and no detections, -1 without images
    assert "IoU metric: segm" in capsys.readouterr().out


def test_synchronize_single_process_group(coco_gt, tmp_path):
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        evaluator = CocoEvaluator(coco_gt, ["bbox"])
        evaluator.update(_predictions(with_masks=False))
        before = {k: list(v) for k, v in evaluator.results["bbox"].items()}
        evaluator.synchronize_between_processes()
        assert evaluator.img_ids == [1, 2, 3, 4]
        assert evaluator.results["bbox"] == before
    finally:
        dist.destroy_process_group()


def test_unknown_iou_type(coco_gt):
    with pytest.raises(ValueError, match="keypoints"):
        CocoEvaluator(coco_gt, ["keypoints"])
