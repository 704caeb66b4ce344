"""Panoptic quality (PQ, SQ, RQ) of predicted COCO panoptic PNGs, with panopticapi's own matching code.

    evaluator = PanopticEvaluator(ann_file, ann_folder, output_dir="out/panoptic_eval")
    for each batch:  evaluator.update(predictions)   # PostProcessPanoptic's dicts + 'image_id' (+ 'file_name')
    evaluator.synchronize_between_processes()
    result = evaluator.summarize()   # {'All', 'Things', 'Stuff': {'pq', 'sq', 'rq', 'n'}, 'per_class': {id: {...}}}

`summarize` returns what panopticapi's `pq_compute` returns (fractions in [0, 1]; main.py logs
`PQ_all`, `PQ_th`, `PQ_st` from it, see `pq_log_stats`), on every process. The numbers are
panopticapi's: each image is scored by `panopticapi.evaluation.pq_compute_single_core` and the
averages are `PQStat.pq_average`; only the orchestration differs from `pq_compute`: no prints, a
pool of processes only for large evaluations, only the predicted images are scored (like
CocoEvaluator, so a subset of a split can be evaluated), and a group without any segment (e.g. a
dataset with no stuff) reports 0 with n = 0 instead of dividing by zero.

panopticapi comes from PyPI's `panopticapi-lite` (the cocodataset/panopticapi code; the upstream
project is not on PyPI). Its metadata pins numpy<2 and pulls in scikit-image, matplotlib and
platformdirs, none of which the evaluation code imports, so install it without dependencies:
`pip install --no-deps panopticapi-lite==0.2.0`.

Distributed: every process writes its PNGs into the one `output_dir` (which must be on a filesystem
that all processes share); `synchronize_between_processes` gathers the JSON entries, rank 0 writes
`predictions.json` and computes PQ once, and the result is sent to every process.
"""
import contextlib
import io
import json
import logging
import math
import multiprocessing
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch.distributed as dist

from util.checkpoint import atomic_write
from util.dist import all_gather, get_rank, get_world_size, is_dist_avail_and_initialized
from util.panoptic import import_panopticapi

from .coco import load_json

logger = logging.getLogger(__name__)

GROUPS = (("All", None), ("Things", True), ("Stuff", False))
IMAGES_PER_PROCESS = 250  # below this many images per process, a pool costs more than it saves
MAX_PROCESSES = 8


def _import_panopticapi():
    return import_panopticapi("evaluation", "PQ evaluation")


def require_panopticapi() -> None:
    """Raise ImportError, with how to install it, when panopticapi is missing (e.g. before a training starts)."""
    _import_panopticapi()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars in segments_info
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class PanopticEvaluator:
    """Collects panoptic predictions (PNG bytes + segments_info per image) and scores them against the
    ground truth `ann_file` (COCO panoptic JSON) and `ann_folder` (its PNGs).

    Predicted PNGs and `predictions.json` are written into `output_dir`. `num_processes` bounds the
    processes used to score the images (default: one per 250 images, at most min(8, cpu count)).
    """

    def __init__(self, ann_file: Union[str, Path], ann_folder: Union[str, Path],
                 output_dir: Union[str, Path] = "panoptic_eval", num_processes: Optional[int] = None):
        _import_panopticapi()  # fail now rather than after a whole evaluation pass
        self.gt_json = Path(ann_file)
        self.gt_folder = Path(ann_folder)
        if not self.gt_json.is_file():
            raise FileNotFoundError(f"panoptic ground truth {self.gt_json} not found")
        if not self.gt_folder.is_dir():
            raise FileNotFoundError(f"panoptic ground-truth PNG folder {self.gt_folder} not found")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.num_processes = num_processes
        # JSON entries {'image_id', 'file_name', 'segments_info'}; file_name is where this process wrote the PNG
        self.predictions: list[dict] = []
        self._final_names: dict[int, str] = {}  # image_id -> the PNG name in predictions.json
        self._duplicates: list[str] = []  # PNGs of padded duplicates, removed by rank 0
        self._synchronized = get_world_size() == 1

    def update(self, predictions: list[dict]) -> None:
        """predictions: one dict per image with 'png_string' (PNG bytes), 'segments_info' and 'image_id';
        'file_name' defaults to the original's `f"{image_id:012d}.png"`. An image seen twice keeps its first
        prediction (distributed samplers pad the last batch with repeated images)."""
        world_size, rank = get_world_size(), get_rank()
        for p in predictions:
            image_id = int(p["image_id"])
            if image_id in self._final_names:
                continue
            final_name = p.get("file_name") or f"{image_id:012d}.png"
            # with several processes a padded duplicate may be written by another process too: rank-tagged
            # names until rank 0 has chosen which copy counts (see synchronize_between_processes)
            name = final_name if world_size == 1 else f"{Path(final_name).stem}.rank{rank}.png"
            with atomic_write(str(self.output_dir / name), durable=False) as f:  # one per image: no fsync
                f.write(p["png_string"])
            self._final_names[image_id] = final_name
            self.predictions.append({"image_id": image_id, "file_name": name,
                                     "segments_info": [dict(s) for s in p["segments_info"]]})

    def synchronize_between_processes(self) -> None:
        """Gather every process's entries, keeping the first of duplicates (rank 0 renames the PNGs when it
        summarizes). A no-op in a single process."""
        if self._synchronized:
            return
        gathered = all_gather((self.predictions, self._final_names))
        self.predictions, self._final_names, self._duplicates = [], {}, []
        for rank_predictions, final_names in gathered:
            for entry in rank_predictions:
                image_id = entry["image_id"]
                if image_id in self._final_names:
                    self._duplicates.append(entry["file_name"])
                    continue
                self._final_names[image_id] = final_names[image_id]
                self.predictions.append(entry)
        self._synchronized = True

    def _finalize_files(self) -> None:
        """Rank 0, after gathering: give the kept PNGs their final names, remove padded duplicates."""
        for name in self._duplicates:
            (self.output_dir / name).unlink(missing_ok=True)
        self._duplicates = []
        for entry in self.predictions:
            final_name = self._final_names[entry["image_id"]]
            if entry["file_name"] == final_name:
                continue
            written = self.output_dir / entry["file_name"]
            if not written.is_file():
                raise FileNotFoundError(
                    f"predicted PNG {written} (image_id {entry['image_id']}) written by another process is not "
                    f"visible here: the panoptic output_dir must be on a filesystem all processes share")
            os.replace(written, self.output_dir / final_name)
            entry["file_name"] = final_name

    def summarize(self) -> dict:
        """Write predictions.json and compute PQ / SQ / RQ once (rank 0); every process gets the result
        {'All' | 'Things' | 'Stuff': {'pq', 'sq', 'rq', 'n'}, 'per_class': {category_id: {'pq', 'sq', 'rq'}}},
        fractions in [0, 1] as panopticapi's pq_compute returns them."""
        self.synchronize_between_processes()
        outcome: Any = None
        if get_rank() == 0:
            try:
                outcome = ("ok", self._compute())
            except Exception as e:  # sent to the other processes too, so that none waits forever
                if get_world_size() == 1:
                    raise
                outcome = ("error", f"{type(e).__name__}: {e}")
        if is_dist_avail_and_initialized() and get_world_size() > 1:
            box = [outcome]
            dist.broadcast_object_list(box, src=0)
            outcome = box[0]
        status, value = outcome
        if status == "error":
            raise RuntimeError(f"panoptic evaluation failed on rank 0: {value}")
        return value

    def _compute(self) -> dict:
        if not self.predictions:
            raise ValueError("PanopticEvaluator: no predictions to evaluate (update() was never given any)")
        self._finalize_files()
        predictions_json = self.output_dir / "predictions.json"
        with atomic_write(str(predictions_json), "w") as f:
            json.dump({"annotations": self.predictions}, f, default=_json_default)
        gt_json = self._ground_truth_for_predictions()
        result = compute_pq(gt_json, predictions_json, self.gt_folder, self.output_dir, self.num_processes)
        logger.info("Panoptic quality over %d images (%s):\n%s", len(self.predictions), self.gt_json,
                    format_pq_table(result))
        return result

    def _ground_truth_for_predictions(self) -> Path:
        """The ground-truth JSON restricted to the predicted images (the file itself when they are all there)."""
        gt = load_json(self.gt_json)
        gt_ids = {ann["image_id"] for ann in gt["annotations"]}
        predicted = {entry["image_id"] for entry in self.predictions}
        unknown = predicted - gt_ids
        if unknown:
            raise ValueError(f"predictions for {len(unknown)} image(s) that {self.gt_json} does not annotate, "
                             f"e.g. image_id {min(unknown)}")
        if predicted == gt_ids:
            return self.gt_json
        logger.info("PQ over the %d predicted images of the %d in %s", len(predicted), len(gt_ids), self.gt_json)
        subset = dict(gt, images=[img for img in gt["images"] if img["id"] in predicted],
                      annotations=[ann for ann in gt["annotations"] if ann["image_id"] in predicted])
        path = self.output_dir / "ground_truth_subset.json"
        with atomic_write(str(path), "w") as f:
            json.dump(subset, f)
        return path


def _score_images(job: tuple) -> Any:
    """panopticapi's per-image scoring of a list of (gt, prediction) annotation pairs, without its prints."""
    evaluation = _import_panopticapi()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return evaluation.pq_compute_single_core(*job)


def compute_pq(gt_json_file: Union[str, Path], pred_json_file: Union[str, Path], gt_folder: Union[str, Path],
               pred_folder: Union[str, Path], num_processes: Optional[int] = None) -> dict:
    """PQ / SQ / RQ of the predictions, with panopticapi's scoring and averaging; same result as
    `panopticapi.evaluation.pq_compute(gt_json_file, pred_json_file, gt_folder, pred_folder)` (up to the order
    of float sums), quietly. Every annotated image of `gt_json_file` needs a prediction."""
    evaluation = _import_panopticapi()
    gt, pred = load_json(gt_json_file), load_json(pred_json_file)
    categories = {c["id"]: c for c in gt["categories"]}
    predictions = {ann["image_id"]: ann for ann in pred["annotations"]}
    missing = [ann["image_id"] for ann in gt["annotations"] if ann["image_id"] not in predictions]
    if missing:
        raise ValueError(f"{pred_json_file} has no prediction for {len(missing)} image(s) of {gt_json_file}, "
                         f"e.g. image_id {missing[0]}")
    pairs = [(ann, predictions[ann["image_id"]]) for ann in gt["annotations"]]

    if num_processes is None:
        num_processes = min(os.cpu_count() or 1, MAX_PROCESSES, math.ceil(len(pairs) / IMAGES_PER_PROCESS))
    num_processes = max(1, min(num_processes, len(pairs)))
    step = math.ceil(len(pairs) / num_processes)
    jobs = [(k, pairs[k * step:(k + 1) * step], str(gt_folder), str(pred_folder), categories)
            for k in range(num_processes)]
    try:
        if num_processes == 1:
            stats = [_score_images(job) for job in jobs]
        else:
            with multiprocessing.get_context().Pool(num_processes) as pool:
                stats = pool.map(_score_images, jobs)
    except KeyError as e:  # panopticapi reports PNG / JSON mismatches and unknown categories as KeyError
        raise ValueError(f"{pred_json_file}: {e.args[0] if e.args else e}") from e
    total = evaluation.PQStat()
    for stat in stats:
        total += stat

    result: dict = {}
    for name, isthing in GROUPS:
        try:
            averages, per_class = total.pq_average(categories, isthing=isthing)
        except ZeroDivisionError:  # no segment of this group in ground truth or predictions
            averages = {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
            per_class = {cat_id: {"pq": 0.0, "sq": 0.0, "rq": 0.0} for cat_id, c in categories.items()
                         if isthing is None or (c["isthing"] == 1) == isthing}
        result[name] = {k: (int(v) if k == "n" else float(v)) for k, v in averages.items()}
        if name == "All":
            result["per_class"] = {cat_id: {k: float(v) for k, v in r.items()} for cat_id, r in per_class.items()}
    return result


def format_pq_table(result: dict) -> str:
    """panopticapi's summary table (PQ, SQ, RQ in %, and the number of categories) as text."""
    lines = [f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}", "-" * 38]
    for name, _ in GROUPS:
        r = result[name]
        lines.append(f"{name:10s}| {100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f} {r['n']:5d}")
    return "\n".join(lines)


def pq_log_stats(result: dict) -> dict:
    """The original's log fields from a `summarize()` result: PQ_all, PQ_th, PQ_st ({'pq', 'sq', 'rq', 'n'})."""
    return {"PQ_all": result["All"], "PQ_th": result["Things"], "PQ_st": result["Stuff"]}
