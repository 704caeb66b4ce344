"""COCO evaluation of DETR predictions: pycocotools (the reference) or hotcoco (the same numbers, much faster).

Predictions are collected in the COCO results format as they come. In a process group they are gathered to
rank 0, which evaluates them once and broadcasts the 12 summary numbers, so no rank repeats the work and
every rank returns the same stats. Only the images that received predictions are evaluated
(params.imgIds), as in the original: evaluating a subset of a split scores that subset.

Backends (``CocoEvaluator(..., backend=...)``, ``--coco_eval_backend``):
- ``pycocotools``: pycocotools' own COCOeval, the reference.
- ``hotcoco``: hotcoco's COCOeval (Rust) for evaluate() + accumulate(); its precision / recall / scores arrays
  are bitwise equal to pycocotools' (tests/test_coco_eval.py checks it), and the 12 numbers are then computed
  and printed by pycocotools' own summarize() from those arrays.
- ``auto``: hotcoco when it can be imported, else pycocotools.

Either way ``coco_eval[iou_type]`` is a pycocotools COCOeval holding ``.params``, ``.eval`` (precision
[T, R, K, A, M], recall, scores, counts, date, params) and, after summarize(), ``.stats``. With hotcoco it
holds only those (no ``cocoGt``/``cocoDt``/``evalImgs``); on ranks other than 0 only ``.stats``.
"""
import contextlib
import copy
import io
import logging
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.dist import get_rank, get_world_size

logger = logging.getLogger(__name__)

SUPPORTED_IOU_TYPES = ("bbox", "segm")
BACKENDS = ("pycocotools", "hotcoco")
BACKEND_CHOICES = ("auto",) + BACKENDS  # util/args.py repeats these for --coco_eval_backend (it imports no pycocotools)


# hotcoco 1.0.x gives precision arrays that differ from pycocotools' (tests/test_coco_eval.py); 1.1.0 on are equal
MIN_HOTCOCO = (1, 1)


def _hotcoco_problem() -> Optional[str]:
    """Why hotcoco cannot be used here, or None."""
    try:
        import hotcoco
    except ImportError as e:
        return f"the hotcoco package cannot be imported ({e})"
    version = tuple(int(part) for part in hotcoco.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_HOTCOCO:
        return f"hotcoco {hotcoco.__version__} is older than {'.'.join(map(str, MIN_HOTCOCO))}"
    return None


def hotcoco_available() -> bool:
    return _hotcoco_problem() is None


def resolve_backend(backend: str) -> str:
    """'auto' -> 'hotcoco' when usable, else 'pycocotools'; an unavailable or unknown backend is an error."""
    if backend == "auto":
        return "hotcoco" if hotcoco_available() else "pycocotools"
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; expected one of {BACKEND_CHOICES}")
    problem = _hotcoco_problem() if backend == "hotcoco" else None
    if problem:
        raise ImportError(f"COCO evaluation backend 'hotcoco' was requested but {problem}: "
                          "`pip install 'hotcoco>=1.1'` (see requirements.txt), or use --coco_eval_backend "
                          "pycocotools (the reference, slower) or auto")
    return backend


class CocoEvaluator:
    """Collects predictions and scores them against `coco_gt` for each of `iou_types`.

    `coco_eval[iou_type]` is a pycocotools COCOeval: `.stats` after `summarize()`, `.eval` (with
    'precision' [T, R, K, A, M]) after `accumulate()` (on rank 0 in a process group).
    `evaluated_images` is the number of images this process evaluated (0 on ranks other than 0 after
    synchronize_between_processes(); None before accumulate()).
    """

    def __init__(self, coco_gt: COCO, iou_types: Any, backend: str = "auto"):
        iou_types = list(iou_types)
        for iou_type in iou_types:
            if iou_type not in SUPPORTED_IOU_TYPES:
                raise ValueError(f"unsupported iou_type {iou_type!r}; expected one of {SUPPORTED_IOU_TYPES}")
        self.backend = resolve_backend(backend)
        self.coco_gt = coco_gt  # never modified: each backend works on its own copy of the index
        self.iou_types = iou_types
        # holders of params / eval / stats; the ground truth is attached when (and where) evaluation runs
        self.coco_eval = {iou_type: _coco_eval_holder(coco_gt, iou_type) for iou_type in iou_types}
        self.img_ids: list[int] = []
        # iou_type -> image_id -> 'bbox': [N, 7] array (image_id, x, y, w, h, score, category_id), pycocotools'
        # numpy results layout (compact to gather, quick to load); 'segm': list of COCO result dicts (RLE masks)
        self.results: dict[str, dict[int, Any]] = {iou_type: {} for iou_type in iou_types}
        self.evaluated_images: Optional[int] = None
        self._gathered_to_rank0 = False  # set by synchronize_between_processes() in a group of several processes

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

    def prepare(self, image_id: int, prediction: dict, iou_type: str) -> Any:
        if iou_type == "bbox":
            return detection_array(image_id, prediction)
        return prepare_for_coco_segmentation(image_id, prediction)

    def synchronize_between_processes(self) -> None:
        """Gather every process's predictions on rank 0 (no-op without a group of several processes).

        Images are merged in rank order; an image already seen (DistributedSampler pads with repeats)
        keeps its first predictions. Other ranks drop theirs: only rank 0 evaluates.
        """
        if get_world_size() == 1:
            return
        rank = get_rank()
        gathered: Optional[list] = [None] * get_world_size() if rank == 0 else None
        dist.gather_object((self.img_ids, self.results), gathered, dst=0)
        self._gathered_to_rank0 = True
        self.img_ids = []
        self.results = {iou_type: {} for iou_type in self.iou_types}
        if rank != 0:
            return
        for img_ids, results in gathered:
            for image_id in img_ids:
                if image_id in self.results[self.iou_types[0]]:
                    continue  # padded duplicate from another process
                self.img_ids.append(image_id)
                for iou_type in self.iou_types:
                    self.results[iou_type][image_id] = results[iou_type][image_id]

    def accumulate(self) -> None:
        """Evaluate and accumulate the collected predictions (on rank 0 only after a gather)."""
        if self._gathered_to_rank0 and get_rank() != 0:
            self.evaluated_images = 0
            return
        image_ids = sorted(self.img_ids)
        # nothing to evaluate: pycocotools' -1 stats (hotcoco reads an empty imgIds as "all images")
        backend_name = self.backend if image_ids else "pycocotools"
        backend = _make_backend(backend_name, self.coco_gt)
        for iou_type, coco_eval in self.coco_eval.items():
            # sorted image order: the merged results of several processes are those of a single process
            per_image = [self.results[iou_type][image_id] for image_id in image_ids]
            if iou_type == "bbox":
                results = np.concatenate(per_image) if per_image else np.zeros((0, 7))
            else:
                results = [r for image_results in per_image for r in image_results]
            coco_eval.params.imgIds = image_ids
            backend.evaluate(coco_eval, results)
        self.evaluated_images = len(image_ids)
        logger.info("COCO evaluation (%s) of %d images with %s on rank %d", ", ".join(self.iou_types),
                    len(image_ids), backend_name, get_rank())

    def summarize(self) -> None:
        """pycocotools' 12-line summary per iou type (printed by the evaluating process); after a gather,
        rank 0 broadcasts the stats so that every rank returns the same numbers."""
        if not self._gathered_to_rank0 or get_rank() == 0:
            with _quiet_unless_main_process():
                for iou_type, coco_eval in self.coco_eval.items():
                    print(f"IoU metric: {iou_type}")
                    coco_eval.summarize()
        if self._gathered_to_rank0:
            stats = [{t: e.stats for t, e in self.coco_eval.items()} if get_rank() == 0 else None]
            dist.broadcast_object_list(stats, src=0)
            for iou_type, coco_eval in self.coco_eval.items():
                coco_eval.stats = np.asarray(stats[0][iou_type])


def _coco_eval_holder(coco_gt: COCO, iou_type: str) -> COCOeval:
    coco_eval = COCOeval(iouType=iou_type)  # without ground truth: nothing can modify the dataset's index
    coco_eval.params.imgIds = sorted(coco_gt.getImgIds())
    coco_eval.params.catIds = sorted(coco_gt.getCatIds())
    return coco_eval


def _make_backend(name: str, coco_gt: COCO):
    return _HotcocoBackend(coco_gt) if name == "hotcoco" else _PycocotoolsBackend(coco_gt)


class _PycocotoolsBackend:
    def __init__(self, coco_gt: COCO):
        # COCOeval turns ground-truth polygons into RLEs in place: work on a copy of the dataset's index
        self.coco_gt = copy.deepcopy(coco_gt)

    def evaluate(self, coco_eval: COCOeval, results: Any) -> None:
        """pycocotools' evaluate() + accumulate() on `results` (a detection array or result dicts), filling
        `coco_eval`."""
        _known_categories(coco_eval, results)  # only for its log line: pycocotools never scores the others
        if isinstance(results, np.ndarray):
            results = detection_dicts(results)
        else:  # loadRes adds fields to the result dicts it is given (id, area, bbox): give it copies
            results = [dict(r) for r in results]
        coco_eval.cocoGt = self.coco_gt
        with contextlib.redirect_stdout(io.StringIO()):  # loadRes and evaluate are chatty
            coco_eval.cocoDt = self.coco_gt.loadRes(results) if results else empty_results(self.coco_gt)
            coco_eval.evaluate()
        with _quiet_unless_main_process():
            coco_eval.accumulate()


class _HotcocoBackend:
    def __init__(self, coco_gt: COCO):
        import hotcoco

        self.hotcoco = hotcoco
        self.coco_gt = hotcoco.COCO(coco_gt.dataset)  # hotcoco's own index; the dict is not modified

    def evaluate(self, coco_eval: COCOeval, results: Any) -> None:
        """hotcoco's evaluate() + accumulate() with `coco_eval.params`; its arrays go into `coco_eval.eval`."""
        p = coco_eval.params
        # Detections of categories the ground truth lacks are never scored (COCOeval loops over its catIds); hotcoco
        # would also print a warning for each such id on stderr, so they are left out here (and counted in the log).
        results = _known_categories(coco_eval, results)
        evaluator = self.hotcoco.COCOeval(self.coco_gt, self.coco_gt.loadRes(results), p.iouType)
        hp = evaluator.params  # a live object: assigning its attributes configures the evaluation
        hp.imgIds = [int(i) for i in p.imgIds]
        hp.catIds = [int(c) for c in p.catIds]
        hp.iouThrs = p.iouThrs.tolist()
        hp.recThrs = p.recThrs.tolist()
        hp.maxDets = [int(m) for m in p.maxDets]
        hp.areaRng = [[float(a), float(b)] for a, b in p.areaRng]
        hp.areaRngLbl = list(p.areaRngLbl)
        hp.useCats = bool(p.useCats)
        evaluator.evaluate()
        evaluator.accumulate()
        ev = evaluator.eval
        coco_eval.eval = {"params": p, "counts": [int(c) for c in ev["counts"]], "date": str(ev["date"]),
                          "precision": np.asarray(ev["precision"]), "recall": np.asarray(ev["recall"]),
                          "scores": np.asarray(ev["scores"])}


def _known_categories(coco_eval: COCOeval, results: Any) -> Any:
    """`results` (detection array or result dicts) without the detections of categories absent from the ground
    truth, which COCO evaluation never scores; logs how many there are."""
    known = set(coco_eval.params.catIds)
    if isinstance(results, np.ndarray):
        keep = np.isin(results[:, 6], list(known))
        dropped = results[~keep, 6].astype(np.int64).tolist()
        kept = results[keep]
    else:
        kept = [r for r in results if r["category_id"] in known]
        dropped = [r["category_id"] for r in results if r["category_id"] not in known]
    if dropped:
        logger.info("%s: %d detections of category ids absent from the ground truth (%s) are not scored, as in "
                    "pycocotools", coco_eval.params.iouType, len(dropped), ", ".join(map(str, sorted(set(dropped)))))
    return kept


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


def detection_array(image_id: int, prediction: dict) -> np.ndarray:
    """[N, 7] float64 rows (image_id, x, y, w, h, score, category_id), pycocotools' numpy results layout; the
    values are exactly those of the prediction's tensors (x1 - x0 computed in their dtype)."""
    boxes = convert_to_xywh(prediction["boxes"].reshape(-1, 4))
    out = np.empty((len(boxes), 7))
    out[:, 0] = image_id
    out[:, 1:5] = boxes.detach().cpu().double().numpy()
    out[:, 5] = prediction["scores"].detach().cpu().double().numpy()
    out[:, 6] = prediction["labels"].detach().cpu().numpy()
    return out


def detection_dicts(array: np.ndarray) -> list[dict]:
    """COCO result dicts (what a results JSON file holds) from `detection_array` rows."""
    return [{"image_id": int(row[0]), "category_id": int(row[6]), "bbox": row[1:5], "score": row[5]}
            for row in array.tolist()]


def prepare_for_coco_detection(image_id: int, prediction: dict) -> list[dict]:
    """COCO result dicts of one image's detections."""
    return detection_dicts(detection_array(image_id, prediction))


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


def plain_eval(coco_eval: COCOeval) -> dict:
    """COCOeval.eval (precision [T, R, K, A, M], recall, scores) as plain types, readable with weights_only: what
    main.py saves as OUTPUT_DIR/eval/latest.pth (``util.plot_utils.plot_precision_recall`` reads it)."""
    ev = coco_eval.eval
    out = {k: torch.as_tensor(ev[k]) for k in ("precision", "recall", "scores")}
    out["counts"] = [int(c) for c in ev["counts"]]
    out["date"] = str(ev["date"])
    p = coco_eval.params
    out["params"] = {"iouThrs": p.iouThrs.tolist(), "recThrs": p.recThrs.tolist(),
                     "catIds": [int(c) for c in p.catIds], "areaRngLbl": [str(a) for a in p.areaRngLbl],
                     "maxDets": [int(m) for m in p.maxDets]}
    out["stats"] = coco_eval.stats.tolist()
    return out
