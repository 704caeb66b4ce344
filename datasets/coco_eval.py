"""COCO evaluation of DETR predictions with pycocotools.

Predictions are collected in the COCO results format as they come, merged across processes, and
evaluated once by pycocotools' own COCOeval, so the numbers are exactly pycocotools' numbers for the
same detections. Only the images that received predictions are evaluated (params.imgIds), as in the
original: evaluating a subset of a split scores that subset.
"""
import contextlib
import copy
import io
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.dist import get_rank

SUPPORTED_IOU_TYPES = ("bbox", "segm")


class CocoEvaluator:
    """Collects predictions and scores them against `coco_gt` for each of `iou_types`.

    `coco_eval[iou_type]` is the pycocotools COCOeval: `.stats` after `summarize()`, `.eval` (with
    'precision' [T, R, K, A, M]) after `accumulate()`.
    """

    def __init__(self, coco_gt: COCO, iou_types: Any):
        iou_types = list(iou_types)
        for iou_type in iou_types:
            if iou_type not in SUPPORTED_IOU_TYPES:
                raise ValueError(f"unsupported iou_type {iou_type!r}; expected one of {SUPPORTED_IOU_TYPES}")
        # COCOeval turns ground-truth polygons into RLEs in place: work on a copy of the dataset's index
        self.coco_gt = copy.deepcopy(coco_gt)
        self.iou_types = iou_types
        self.coco_eval = {iou_type: COCOeval(self.coco_gt, iouType=iou_type) for iou_type in iou_types}
        self.img_ids: list[int] = []
        # iou_type -> image_id -> list of COCO result dicts
        self.results: dict[str, dict[int, list[dict]]] = {iou_type: {} for iou_type in iou_types}

    def update(self, predictions: dict[int, dict[str, torch.Tensor]]) -> None:
        """predictions: {image_id: {'scores' [N], 'labels' [N], 'boxes' [N, 4] (x0, y0, x1, y1) absolute,
        optional 'masks' [N, 1, H, W] uint8/bool}}. An image seen twice keeps its first predictions
        (distributed samplers pad the last batch with repeated images)."""
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            if image_id in self.results[self.iou_types[0]]:
                continue
            self.img_ids.append(image_id)
            for iou_type in self.iou_types:
                self.results[iou_type][image_id] = self.prepare(image_id, prediction, iou_type)

    def prepare(self, image_id: int, prediction: dict, iou_type: str) -> list[dict]:
        if iou_type == "bbox":
            return prepare_for_coco_detection(image_id, prediction)
        return prepare_for_coco_segmentation(image_id, prediction)

    def synchronize_between_processes(self) -> None:
        """Gather every process's predictions (no-op when torch.distributed is not initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.img_ids, self.results))
        self.img_ids = []
        self.results = {iou_type: {} for iou_type in self.iou_types}
        for img_ids, results in gathered:
            for image_id in img_ids:
                if image_id in self.results[self.iou_types[0]]:
                    continue  # padded duplicate from another process
                self.img_ids.append(image_id)
                for iou_type in self.iou_types:
                    self.results[iou_type][image_id] = results[iou_type][image_id]

    def accumulate(self) -> None:
        """Run pycocotools' evaluate() and accumulate() on the collected predictions."""
        for iou_type, coco_eval in self.coco_eval.items():
            results = [r for image_id in self.img_ids for r in self.results[iou_type][image_id]]
            with contextlib.redirect_stdout(io.StringIO()):  # loadRes and evaluate are chatty
                coco_eval.cocoDt = self.coco_gt.loadRes(results) if results else empty_results(self.coco_gt)
                coco_eval.params.imgIds = sorted(self.img_ids)
                coco_eval.evaluate()
            with _quiet_unless_main_process():
                coco_eval.accumulate()

    def summarize(self) -> None:
        """pycocotools' 12-line summary per iou type (printed by the main process only)."""
        with _quiet_unless_main_process():
            for iou_type, coco_eval in self.coco_eval.items():
                print(f"IoU metric: {iou_type}")
                coco_eval.summarize()


def _quiet_unless_main_process():
    return contextlib.redirect_stdout(io.StringIO()) if get_rank() != 0 else contextlib.nullcontext()


def empty_results(coco_gt: COCO) -> COCO:
    """A results index with no detections (pycocotools' loadRes cannot take an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                       "categories": copy.deepcopy(coco_gt.dataset.get("categories", []))}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def convert_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    xmin, ymin, xmax, ymax = boxes.unbind(1)
    return torch.stack((xmin, ymin, xmax - xmin, ymax - ymin), dim=1)


def prepare_for_coco_detection(image_id: int, prediction: dict) -> list[dict]:
    if len(prediction["boxes"]) == 0:
        return []
    boxes = convert_to_xywh(prediction["boxes"]).tolist()
    scores = prediction["scores"].tolist()
    labels = prediction["labels"].tolist()
    return [{"image_id": image_id, "category_id": label, "bbox": box, "score": score}
            for box, label, score in zip(boxes, labels, scores)]


def prepare_for_coco_segmentation(image_id: int, prediction: dict) -> list[dict]:
    if len(prediction["masks"]) == 0:
        return []
    masks = prediction["masks"] > 0.5 if prediction["masks"].is_floating_point() else prediction["masks"] > 0
    scores = prediction["scores"].tolist()
    labels = prediction["labels"].tolist()
    results = []
    for mask, label, score in zip(masks.cpu().numpy(), labels, scores):
        rle = mask_util.encode(np.asfortranarray(mask[0, :, :, None], dtype=np.uint8))[0]
        rle["counts"] = rle["counts"].decode("utf-8")  # JSON-friendly, as in COCO result files
        results.append({"image_id": image_id, "category_id": label, "segmentation": rle, "score": score})
    return results
