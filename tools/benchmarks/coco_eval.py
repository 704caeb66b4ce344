"""COCO evaluation speed, side by side: every available CocoEvaluator backend on the same generated detections.

    python -m tools.benchmarks.coco_eval                 # 5,000 images x 100 detections, bbox
    python -m tools.benchmarks.coco_eval --num_images 500 --iou_type segm --height 120 --width 160

`synthetic_coco()` generates a deterministic ground truth and DETR-like predictions with numpy (tests use it for
the backend-equality checks); `benchmark_backends()` returns the timings as a dict for `tools.benchmarks.cpu`.
"""
import argparse
import contextlib
import io
import logging
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from datasets.coco_eval import BACKENDS, CocoEvaluator, hotcoco_available

logger = logging.getLogger(__name__)


def _octagon(x: float, y: float, w: float, h: float) -> list[float]:
    """A box with its corners cut (area 7/8 of the box): a polygon that is not its own bounding box."""
    cw, ch = w / 4, h / 4
    return [x + cw, y, x + w - cw, y, x + w, y + ch, x + w, y + h - ch,
            x + w - cw, y + h, x + cw, y + h, x, y + h - ch, x, y + ch]


def _rectangle_rle(x: float, y: float, w: float, h: float, height: int, width: int) -> tuple[dict, float]:
    """Uncompressed (column-major) RLE of the pixels of a box, as COCO stores crowd regions; and its area."""
    x0, y0 = int(np.clip(np.floor(x), 0, width - 1)), int(np.clip(np.floor(y), 0, height - 1))
    x1, y1 = int(np.clip(np.ceil(x + w), x0 + 1, width)), int(np.clip(np.ceil(y + h), y0 + 1, height))
    run, cols = y1 - y0, x1 - x0
    counts = [x0 * height + y0] + [run, height - run] * (cols - 1) + [run]
    counts.append(height * width - sum(counts))
    return {"size": [height, width], "counts": counts}, float(run * cols)


def synthetic_coco(num_images: int = 5000, dets_per_image: int = 100, *, seed: int = 0, masks: bool = False,
                   height: int = 480, width: int = 640, num_categories: int = 80
                   ) -> tuple[COCO, dict[int, dict[str, torch.Tensor]]]:
    """A pycocotools ground-truth index and DETR-like predictions ({image_id: {'scores' [N], 'labels' [N],
    'boxes' [N, 4] (x0, y0, x1, y1) absolute, 'masks' [N, 1, H, W] uint8 when `masks`}}), deterministic in `seed`.

    Built-in edge cases: images without ground truth (every 17th), images without detections (every 13th),
    images with 20% more than `dets_per_image` detections (every 11th: above maxDets 100 by default), crowd
    objects (~4%, RLE), a category that is never predicted, labels that are no category (0 and a gap in the
    ids, ~1%), tied scores (3 decimals), boxes leaving the image, an empty mask (every 7th image, with masks).
    Category ids have gaps like COCO's.
    """
    rng = np.random.default_rng(seed)
    cat_ids = np.sort(rng.choice(np.arange(1, 91), num_categories, replace=False))
    never_predicted = int(cat_ids[0])
    not_a_category = np.array([0, int(np.setdiff1d(np.arange(1, 92), cat_ids)[0])])
    size = np.array([width, height], dtype=np.float64)
    max_side = 0.9 * min(height, width)
    images, anns, predictions = [], [], {}
    for i in range(num_images):
        image_id = 3 * i + 1  # not contiguous, not starting at 0
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": height, "width": width})
        n_gt = 0 if i % 17 == 5 else int(rng.poisson(7))
        sides = np.exp(rng.uniform(np.log(4), np.log(max_side), size=(n_gt, 2)))
        gt_boxes = np.round(np.concatenate([rng.random((n_gt, 2)) * (size - sides), sides], 1), 2)  # x, y, w, h
        gt_cats = rng.choice(cat_ids, n_gt)
        crowd = rng.random(n_gt) < 0.04
        for (x, y, w, h), c, is_crowd in zip(gt_boxes.tolist(), gt_cats.tolist(), crowd.tolist()):
            if is_crowd:
                segmentation, area = _rectangle_rle(x, y, w, h, height, width)
            else:
                segmentation, area = [_octagon(x, y, w, h)], 0.875 * w * h
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c, "bbox": [x, y, w, h],
                         "area": area, "iscrowd": int(is_crowd), "segmentation": segmentation})

        n_det = 0 if i % 13 == 7 else dets_per_image + (dets_per_image // 5 if i % 11 == 3 else 0)
        # about half of the detections near an object (jittered, 85% with its class), the rest anywhere
        n_near = min(n_det // 2, 3 * n_gt)
        src = rng.integers(0, max(n_gt, 1), n_near)
        near = gt_boxes[src] + rng.normal(0, 0.08, (n_near, 4)) * gt_boxes[src][:, [2, 3, 2, 3]]
        near[:, 2:] = np.maximum(near[:, 2:], 1.0)
        near_cats = np.where(rng.random(n_near) < 0.85, gt_cats[src], rng.choice(cat_ids, n_near))
        n_far = n_det - n_near
        far_sides = np.exp(rng.uniform(np.log(3), np.log(max_side), size=(n_far, 2)))
        far = np.concatenate([rng.random((n_far, 2)) * (size - far_sides), far_sides], 1)
        boxes = np.concatenate([near, far])
        labels = np.concatenate([near_cats, rng.choice(cat_ids, n_far)]).astype(np.int64)
        labels[labels == never_predicted] = cat_ids[1]
        odd = rng.random(n_det) < 0.01
        labels[odd] = rng.choice(not_a_category, int(odd.sum()))
        scores = np.round(rng.random(n_det), 3)
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)
        prediction = {"scores": torch.tensor(scores, dtype=torch.float32),
                      "labels": torch.from_numpy(labels),
                      "boxes": torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4)}
        if masks:
            m = np.zeros((n_det, 1, height, width), dtype=np.uint8)
            for k, (x, y, w, h) in enumerate(boxes.tolist()):
                if k == 0 and i % 7 == 2:
                    continue  # an empty mask
                rle = mask_util.merge(mask_util.frPyObjects([_octagon(x, y, w, h)], height, width))
                m[k, 0] = mask_util.decode(rle)
            prediction["masks"] = torch.from_numpy(m)
        predictions[image_id] = prediction

    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": anns,
                       "categories": [{"id": int(c), "name": f"category {c}", "supercategory": "thing"}
                                      for c in cat_ids]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    return coco_gt, predictions


def benchmark_backends(num_images: int = 5000, dets_per_image: int = 100, *, iou_type: str = "bbox", seed: int = 0,
                       backends: Optional[Sequence[str]] = None, height: int = 480, width: int = 640) -> dict:
    """Times CocoEvaluator.accumulate() + summarize() per backend on the same `synthetic_coco` data.

    The timed part is what an evaluation costs after the predictions are collected (ground-truth copy or index,
    loading the results, evaluate, accumulate, summary); converting the predictions to COCO results is the same
    code for every backend and is timed apart ('prepare_s'). CPU time (all threads of the process) is reported
    beside wall time: on a shared machine it is the steadier of the two. Returns {'num_images', 'dets_per_image',
    'iou_type', 'num_detections', 'cpu_count', 'load_average', 'backends': {name: {'seconds', 'speedup'
    (pycocotools' seconds / these), 'cpu_seconds', 'cpu_speedup', 'prepare_s', 'stats' (12 numbers),
    'identical_stats', 'identical_precision' (vs pycocotools; None without it)}}}.
    """
    if backends is None:
        backends = [b for b in BACKENDS if b != "hotcoco" or hotcoco_available()]
    coco_gt, predictions = synthetic_coco(num_images, dets_per_image, seed=seed, masks=iou_type == "segm",
                                          height=height, width=width)
    rows, precisions = {}, {}
    for name in backends:
        evaluator = CocoEvaluator(coco_gt, [iou_type], backend=name)
        start = time.perf_counter()
        evaluator.update(predictions)
        prepared, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.accumulate()
            evaluator.summarize()
        seconds, cpu_seconds = time.perf_counter() - prepared, time.process_time() - cpu
        coco_eval = evaluator.coco_eval[iou_type]
        rows[name] = {"seconds": seconds, "cpu_seconds": cpu_seconds, "prepare_s": prepared - start,
                      "stats": coco_eval.stats.tolist()}
        precisions[name] = coco_eval.eval["precision"]
        logger.info("%s: %.3f s", name, seconds)
    reference = rows.get("pycocotools")
    for name, row in rows.items():
        row["speedup"] = reference["seconds"] / row["seconds"] if reference else None
        row["cpu_speedup"] = reference["cpu_seconds"] / row["cpu_seconds"] if reference else None
        row["identical_stats"] = row["stats"] == reference["stats"] if reference else None
        row["identical_precision"] = (bool(np.array_equal(precisions[name], precisions["pycocotools"]))
                                      if reference else None)
    num_detections = sum(len(p["scores"]) for p in predictions.values())
    return {"num_images": num_images, "dets_per_image": dets_per_image, "iou_type": iou_type,
            "num_detections": num_detections, "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0],
            "backends": rows}


def format_table(result: dict) -> str:
    lines = [f"COCO evaluation ({result['iou_type']}), {result['num_images']} images x {result['dets_per_image']} "
             f"detections ({result['num_detections']} in all), {result['cpu_count']} CPUs, "
             f"load average {result['load_average']:.1f}",
             f"{'backend':<12} {'wall s':>8} {'speedup':>8} {'CPU s':>8} {'speedup':>8}  {'same 12 stats':<13} "
             f"{'same precision':<14} AP / AP50"]
    for name, row in result["backends"].items():
        speedup = f"{row['speedup']:.1f}x" if row["speedup"] is not None else "-"
        cpu_speedup = f"{row['cpu_speedup']:.1f}x" if row["cpu_speedup"] is not None else "-"
        lines.append(f"{name:<12} {row['seconds']:>8.3f} {speedup:>8} {row['cpu_seconds']:>8.3f} {cpu_speedup:>8}  "
                     f"{str(row['identical_stats']):<13} {str(row['identical_precision']):<14} "
                     f"{row['stats'][0]:.4f} / {row['stats'][1]:.4f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Time the COCO evaluation backends side by side.")
    parser.add_argument("--num_images", type=int, default=5000, help="images in the generated split")
    parser.add_argument("--dets_per_image", type=int, default=100, help="detections per image (some get 20%% more)")
    parser.add_argument("--iou_type", default="bbox", choices=("bbox", "segm"), help="what is evaluated")
    parser.add_argument("--height", type=int, default=480, help="image height (masks are this size)")
    parser.add_argument("--width", type=int, default=640, help="image width")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                        help="backends to time (default: every installed one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    args = parser.parse_args(argv)
    result = benchmark_backends(args.num_images, args.dets_per_image, iou_type=args.iou_type, seed=args.seed,
                                backends=args.backends, height=args.height, width=args.width)
    print(format_table(result))


if __name__ == "__main__":
    main()
