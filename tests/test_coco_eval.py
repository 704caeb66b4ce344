"""datasets.coco_eval.CocoEvaluator gives exactly pycocotools' numbers, with either backend, in one process or
gathered from two."""
import contextlib
import copy
import datetime
import io
import json
import socket
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets.coco_eval import BACKEND_CHOICES, CocoEvaluator, hotcoco_available, resolve_backend
from tools.benchmarks.coco_eval import benchmark_backends, synthetic_coco

H, W = 40, 50
BACKENDS = ["pycocotools", pytest.param("hotcoco", marks=pytest.mark.skipif(
    not hotcoco_available(), reason="hotcoco is not installed (pip install hotcoco)"))]


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_bbox_and_segm_equal_pycocotools(coco_gt, capsys, backend):
    reference = {t: _direct_stats(coco_gt, t) for t in ("bbox", "segm")}
    evaluator = CocoEvaluator(coco_gt, ["bbox", "segm"], backend=backend)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_ground_truth_index_is_not_modified(coco_gt, backend):
    before = json.dumps(coco_gt.dataset, sort_keys=True)
    evaluator = CocoEvaluator(coco_gt, ["segm", "bbox"], backend=backend)
    evaluator.update(_predictions(with_masks=True))
    evaluator.accumulate()
    assert json.dumps(coco_gt.dataset, sort_keys=True) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_subset_of_images_is_scored_alone(coco_gt, backend):
    # only the images that got predictions are evaluated, as in the original
    evaluator = CocoEvaluator(coco_gt, ["bbox"], backend=backend)
    evaluator.update({3: _predictions(with_masks=False)[3]})
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.coco_eval["bbox"].params.imgIds == [3]
    assert evaluator.evaluated_images == 1
    # image 3: one object (10, 10, 20, 15) found by the best-scored detection (11, 11, 19, 14) with
    # IoU 266/300 = 0.887: a match at 8 of the 10 thresholds 0.50..0.95
    assert evaluator.coco_eval["bbox"].stats[:3].tolist() == pytest.approx([0.8, 1.0, 1.0], abs=1e-12)


def test_duplicate_images_keep_first_predictions(coco_gt):
    preds = _predictions(with_masks=False)
    evaluator = CocoEvaluator(coco_gt, ["bbox"])
    evaluator.update(preds)
    evaluator.update({1: preds[2]})  # a padded repeat must not add detections
    assert evaluator.img_ids == [1, 2, 3, 4]
    assert len(evaluator.results["bbox"][1]) == len(preds[1]["boxes"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("updated", [True, False])
def test_empty_predictions_do_not_crash(coco_gt, updated, capsys, backend):
    evaluator = CocoEvaluator(coco_gt, ["bbox", "segm"], backend=backend)
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
        before = {k: v.copy() for k, v in evaluator.results["bbox"].items()}
        evaluator.synchronize_between_processes()
        assert evaluator.img_ids == [1, 2, 3, 4]
        assert evaluator.results["bbox"].keys() == before.keys()
        assert all(np.array_equal(evaluator.results["bbox"][k], v) for k, v in before.items())
    finally:
        dist.destroy_process_group()


def test_unknown_iou_type(coco_gt):
    with pytest.raises(ValueError, match="keypoints"):
        CocoEvaluator(coco_gt, ["keypoints"])


# ---- generated detections: the fast backend against pycocotools, edge cases included ----

def _reference_eval(coco_gt, predictions, iou_type):
    """pycocotools alone on the predictions: the numbers every backend must give."""
    results = []
    for image_id, p in predictions.items():
        # x, y, w, h computed in float32, as the predictions are
        xywh = torch.cat([p["boxes"][:, :2], p["boxes"][:, 2:] - p["boxes"][:, :2]], 1).tolist()
        for k, (box, score, label) in enumerate(zip(xywh, p["scores"].tolist(), p["labels"].tolist())):
            result = {"image_id": image_id, "category_id": label, "score": score}
            if iou_type == "bbox":
                result["bbox"] = box
            else:
                result["segmentation"] = mask_util.encode(np.asfortranarray(p["masks"][k, 0].numpy()))
            results.append(result)
    gt = copy.deepcopy(coco_gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(gt, gt.loadRes(results), iouType=iou_type)
        coco_eval.params.imgIds = sorted(predictions)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _assert_edge_cases_present(coco_gt, predictions):
    cat_ids = set(coco_gt.getCatIds())
    gt_images = {a["image_id"] for a in coco_gt.dataset["annotations"]}
    sizes = [len(p["scores"]) for p in predictions.values()]
    labels = set(torch.cat([p["labels"] for p in predictions.values()]).tolist())
    assert set(predictions) - gt_images, "an image without ground truth"
    assert 0 in sizes and max(sizes) > 100, "an image without detections and one above maxDets 100"
    assert any(a["iscrowd"] for a in coco_gt.dataset["annotations"]), "crowd objects"
    assert cat_ids - labels, "a category without detections"
    assert labels - cat_ids, "labels that are no category"
    scores = torch.cat([p["scores"] for p in predictions.values()])
    assert len(scores.unique()) < len(scores), "tied scores"


@pytest.mark.skipif(not hotcoco_available(), reason="hotcoco is not installed (pip install hotcoco)")
@pytest.mark.parametrize("iou_type, num_images, dets, size", [("bbox", 60, 100, (480, 640)),
                                                              ("segm", 30, 100, (40, 56))])
def test_hotcoco_equals_pycocotools_on_generated_detections(iou_type, num_images, dets, size, capfd):
    coco_gt, predictions = synthetic_coco(num_images, dets, seed=3, masks=iou_type == "segm",
                                          height=size[0], width=size[1])
    _assert_edge_cases_present(coco_gt, predictions)
    evaluators = {}
    for backend in ("pycocotools", "hotcoco"):
        evaluator = CocoEvaluator(coco_gt, [iou_type], backend=backend)
        evaluator.update(predictions)
        evaluator.accumulate()
        evaluator.summarize()
        evaluators[backend] = evaluator
    reference = _reference_eval(coco_gt, predictions, iou_type)
    assert 0.05 < reference.stats[0] < 0.9  # a non-trivial case
    for backend, evaluator in evaluators.items():
        coco_eval = evaluator.coco_eval[iou_type]
        assert np.array_equal(coco_eval.stats, reference.stats), backend
        for key in ("precision", "recall", "scores"):
            assert np.array_equal(coco_eval.eval[key], reference.eval[key]), (backend, key)
        assert coco_eval.eval["counts"] == reference.eval["counts"]
    # hotcoco warns on stderr about unknown category ids; those detections never reach it
    assert "hotcoco" not in capfd.readouterr().err


@pytest.mark.skipif(not hotcoco_available(), reason="hotcoco is not installed (pip install hotcoco)")
def test_unknown_labels_are_reported_not_scored(caplog):
    coco_gt, predictions = synthetic_coco(3, 10, seed=1)
    predictions[1]["labels"][:2] = 0  # no category 0
    labels = torch.cat([p["labels"] for p in predictions.values()]).tolist()
    unknown = [label for label in labels if label not in coco_gt.getCatIds()]
    assert len(unknown) >= 2
    expected = (f"bbox: {len(unknown)} detections of category ids absent from the ground truth "
                f"({', '.join(map(str, sorted(set(unknown))))}) are not scored")
    for backend in ("pycocotools", "hotcoco"):
        evaluator = CocoEvaluator(coco_gt, ["bbox"], backend=backend)
        evaluator.update(predictions)
        with caplog.at_level("INFO", logger="datasets.coco_eval"):
            evaluator.accumulate()
        assert expected in caplog.text, backend
        caplog.clear()


# ---- backend selection ----

def test_backend_selection(monkeypatch):
    assert resolve_backend("pycocotools") == "pycocotools"
    assert resolve_backend("auto") == ("hotcoco" if hotcoco_available() else "pycocotools")
    with pytest.raises(ValueError, match="unknown COCO evaluation backend 'faster'"):
        resolve_backend("faster")
    monkeypatch.setitem(sys.modules, "hotcoco", None)  # what an absent package looks like to `import`
    assert resolve_backend("auto") == "pycocotools"
    with pytest.raises(ImportError, match="'hotcoco' was requested but the hotcoco package cannot be imported"):
        resolve_backend("hotcoco")


def test_unavailable_backend_is_refused_by_the_evaluator(coco_gt, monkeypatch):
    monkeypatch.setitem(sys.modules, "hotcoco", None)
    with pytest.raises(ImportError, match="pip install 'hotcoco>=1.1'"):
        CocoEvaluator(coco_gt, ["bbox"], backend="hotcoco")
    assert CocoEvaluator(coco_gt, ["bbox"]).backend == "pycocotools"


def test_old_hotcoco_is_not_used(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "hotcoco", types.SimpleNamespace(__version__="1.0.1"))
    assert not hotcoco_available() and resolve_backend("auto") == "pycocotools"
    with pytest.raises(ImportError, match="hotcoco 1.0.1 is older than 1.1"):
        resolve_backend("hotcoco")


def test_command_line_flag_offers_the_evaluator_backends():
    from util.args import get_args_parser

    parser = get_args_parser()
    action = next(a for a in parser._actions if a.dest == "coco_eval_backend")
    assert tuple(action.choices) == BACKEND_CHOICES and action.default == "auto"
    assert parser.parse_args(["--coco_eval_backend", "pycocotools"]).coco_eval_backend == "pycocotools"


def test_engine_passes_the_backend_on(coco_gt, monkeypatch):
    import engine

    seen = {}

    class Recording(CocoEvaluator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["backend"] = self.backend

    monkeypatch.setattr(engine, "CocoEvaluator", Recording)
    stats, _ = engine.evaluate(torch.nn.Identity(), torch.nn.Identity(), {"bbox": None}, [], coco_gt,
                               torch.device("cpu"), "", coco_eval_backend="pycocotools")
    assert seen["backend"] == "pycocotools" and len(stats["coco_eval_bbox"]) == 12


def test_benchmark_reports_every_backend():
    result = benchmark_backends(num_images=20, dets_per_image=20)
    backends = result["backends"]
    assert list(backends)[0] == "pycocotools" and backends["pycocotools"]["speedup"] == 1.0
    for row in backends.values():
        assert row["identical_stats"] and row["identical_precision"] and row["seconds"] > 0 and row["cpu_seconds"] > 0
    assert result["num_detections"] == sum(20 + (4 if i % 11 == 3 else 0) for i in range(20) if i % 13 != 7)


# ---- two processes (gloo): rank 0 evaluates once, every rank returns the single-process numbers ----

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_worker(rank, port, out_dir, backends):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    try:
        coco_gt, predictions = synthetic_coco(25, 30, seed=5, masks=True, height=32, width=40)
        image_ids = sorted(predictions)
        sampler = torch.utils.data.DistributedSampler(image_ids, num_replicas=WORLD_SIZE, rank=rank, shuffle=False)
        share = [image_ids[i] for i in sampler]  # 25 images on 2 ranks: rank 1 also gets image_ids[0] again
        report = {"share": share}
        for backend in backends:
            evaluator = CocoEvaluator(coco_gt, ["bbox", "segm"], backend=backend)
            for start in range(0, len(share), 4):  # batches of 4, like the engine
                batch = {}
                for image_id in share[start:start + 4]:
                    prediction = dict(predictions[image_id])
                    if rank > 0 and image_id == image_ids[0]:  # the padded repeat differs: it must be dropped
                        prediction["scores"] = 1 - prediction["scores"]
                    batch[image_id] = prediction
                evaluator.update(batch)
            evaluator.synchronize_between_processes()
            with contextlib.redirect_stdout(io.StringIO()):
                evaluator.accumulate()
                evaluator.summarize()
            report[backend] = {"evaluated_images": evaluator.evaluated_images,
                               "stats": {t: e.stats for t, e in evaluator.coco_eval.items()},
                               "precision": {t: e.eval.get("precision") for t, e in evaluator.coco_eval.items()}}
        torch.save(report, f"{out_dir}/rank{rank}.pth")
    finally:
        dist.destroy_process_group()


def test_two_processes_evaluate_once_and_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    backends = [b for b in ("pycocotools", "hotcoco") if b != "hotcoco" or hotcoco_available()]
    mp.spawn(_two_process_worker, args=(_free_port(), str(tmp_path), backends), nprocs=WORLD_SIZE, join=True)
    reports = [torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in range(WORLD_SIZE)]
    coco_gt, predictions = synthetic_coco(25, 30, seed=5, masks=True, height=32, width=40)
    assert sum(len(r["share"]) for r in reports) == 26 and reports[1]["share"][-1] == min(predictions)
    for backend in backends:
        single = CocoEvaluator(coco_gt, ["bbox", "segm"], backend=backend)
        single.update(predictions)
        with contextlib.redirect_stdout(io.StringIO()):
            single.accumulate()
            single.summarize()
        assert single.evaluated_images == 25
        assert [r[backend]["evaluated_images"] for r in reports] == [25, 0]  # only rank 0 evaluated
        for iou_type in ("bbox", "segm"):
            expected = single.coco_eval[iou_type]
            assert expected.stats[0] > 0.05
            for report in reports:  # every rank returns the single-process numbers, exactly
                assert np.array_equal(report[backend]["stats"][iou_type], expected.stats), (backend, iou_type)
            assert np.array_equal(reports[0][backend]["precision"][iou_type], expected.eval["precision"])
            assert reports[1][backend]["precision"][iou_type] is None  # nothing accumulated on rank 1
