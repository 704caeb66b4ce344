"""datasets.panoptic_eval: PQ equal to panopticapi's pq_compute, perfect predictions, distributed merging; and
segm AP of a panoptic dataset's detection annotations through CocoEvaluator equal to pycocotools' own."""
import contextlib
import copy
import io
import json
import multiprocessing
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.cocoeval import COCOeval

import datasets
from datasets import synthetic
from datasets.coco_eval import CocoEvaluator
from models.segmentation import PostProcessPanoptic

evaluation = pytest.importorskip("panopticapi.evaluation", reason="panoptic evaluation needs panopticapi-lite")
from datasets.panoptic_eval import PanopticEvaluator, compute_pq, format_pq_table, pq_log_stats  # noqa: E402


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("pq") / "data", seed=5, num_train=1, num_val=4,
                              image_size=64)


@pytest.fixture(scope="module")
def gt(generated):
    """(panoptic JSON path, PNG folder, {image_id: (id map [H, W], segments_info)}, categories)."""
    ann_file = generated / "annotations" / "panoptic_val2017.json"
    folder = generated / "annotations" / "panoptic_val2017"
    data = json.loads(ann_file.read_text())
    images = {}
    for ann in data["annotations"]:
        id_map = synthetic.rgb_to_id(np.asarray(PIL.Image.open(folder / ann["file_name"])))
        images[ann["image_id"]] = (id_map, ann["segments_info"])
    return ann_file, folder, images, {c["id"]: c for c in data["categories"]}


def _prediction(image_id, id_map, segments):
    """A prediction dict as PostProcessPanoptic + engine give it: PNG bytes, segments_info, image_id, file_name."""
    with io.BytesIO() as out:
        PIL.Image.fromarray(synthetic.id_to_rgb(id_map)).save(out, format="PNG")
        png = out.getvalue()
    return {"png_string": png, "segments_info": segments, "image_id": image_id, "file_name": f"{image_id:012d}.png"}


def _hand_made(gt):
    """Predictions with matches, misses, a wrong class, a spurious segment and merged stuff."""
    _, _, images, categories = gt
    things = [c for c, info in categories.items() if info["isthing"]]
    predictions = []
    for k, (image_id, (id_map, segments)) in enumerate(sorted(images.items())):
        pred = np.zeros_like(id_map)
        info = []
        for n, segment in enumerate(segments, start=1):
            mask = id_map == segment["id"]
            category = segment["category_id"]
            if k == 1 and n == 1:  # eroded: fewer pixels, a lower IoU
                rows = np.nonzero(mask.any(1))[0]
                mask = mask & (np.arange(len(mask))[:, None] < rows[len(rows) * 2 // 3])
            if k == 1 and n == 2:  # wrong class: a false positive and a false negative
                category = things[(things.index(category) + 1) % len(things)] if category in things else category
            if k == 2 and n == 1:  # missed: its pixels are left unlabelled
                continue
            if k == 3 and not categories[category]["isthing"]:  # both stuff regions predicted as one 'sky'
                category = synthetic.SKY
            pred[mask] = n
            info.append({"id": n, "category_id": category})
        if k == 2:  # a spurious thing cut out of the image's lower part
            spurious = (pred != 0) & (np.arange(len(pred))[:, None] > len(pred) * 3 // 4)
            spurious &= np.arange(pred.shape[1])[None, :] < pred.shape[1] // 3
            pred[spurious] = 99
            info.append({"id": 99, "category_id": things[0]})
        if k == 3:  # merge the stuff segments into one
            stuff_ids = [s["id"] for s in info if s["category_id"] == synthetic.SKY]
            pred[np.isin(pred, stuff_ids[1:])] = stuff_ids[0]
            info = [s for s in info if s["id"] not in stuff_ids[1:]]
        predictions.append(_prediction(image_id, pred, info))
    return predictions


def _write_predictions(folder: Path, predictions) -> Path:
    folder.mkdir()
    for p in predictions:
        (folder / p["file_name"]).write_bytes(p["png_string"])
    path = folder.parent / f"{folder.name}.json"
    path.write_text(json.dumps({"annotations": [{k: p[k] for k in ("image_id", "file_name", "segments_info")}
                                                for p in predictions]}))
    return path


def _reference(gt_json, pred_json, gt_folder, pred_folder):
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluation.pq_compute(str(gt_json), str(pred_json), gt_folder=str(gt_folder),
                                     pred_folder=str(pred_folder))


def _assert_same(result, reference):
    for group in ("All", "Things", "Stuff"):
        assert result[group]["n"] == reference[group]["n"]
        for key in ("pq", "sq", "rq"):
            assert result[group][key] == pytest.approx(reference[group][key], rel=1e-12, abs=1e-15), (group, key)
    assert set(result["per_class"]) == set(reference["per_class"])
    for cat_id, values in reference["per_class"].items():
        assert result["per_class"][cat_id] == pytest.approx(values, rel=1e-12, abs=1e-15)


def test_hand_made_predictions_equal_pq_compute(gt, tmp_path):
    ann_file, folder, _, _ = gt
    predictions = _hand_made(gt)
    pred_json = _write_predictions(tmp_path / "direct", copy.deepcopy(predictions))
    reference = _reference(ann_file, pred_json, folder, tmp_path / "direct")
    assert 0.2 < reference["All"]["pq"] < 0.95  # the hand-made errors are visible, not everything failed
    assert reference["Things"]["n"] == 3 and reference["Stuff"]["n"] == 2

    evaluator = PanopticEvaluator(ann_file, folder, output_dir=tmp_path / "eval")
    evaluator.update(predictions[:2])
    evaluator.update(predictions[2:])
    evaluator.synchronize_between_processes()
    result = evaluator.summarize()
    _assert_same(result, reference)
    # what it wrote is what panopticapi reads
    written = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert [a["file_name"] for a in written["annotations"]] == [p["file_name"] for p in predictions]
    _assert_same(_reference(ann_file, tmp_path / "eval" / "predictions.json", folder, tmp_path / "eval"), reference)
    # the same numbers with a pool of processes, and directly from the files
    _assert_same(compute_pq(ann_file, pred_json, folder, tmp_path / "direct", num_processes=2), reference)
    assert pq_log_stats(result) == {"PQ_all": result["All"], "PQ_th": result["Things"], "PQ_st": result["Stuff"]}
    assert format_pq_table(result).splitlines()[2].startswith("All       | ")


def test_perfect_prediction_gives_pq_100(gt, tmp_path):
    ann_file, folder, images, _ = gt
    predictions = [_prediction(image_id, id_map, [{"id": s["id"], "category_id": s["category_id"]}
                                                  for s in segments])
                   for image_id, (id_map, segments) in images.items()]
    evaluator = PanopticEvaluator(ann_file, folder, output_dir=tmp_path / "eval")
    evaluator.update(predictions)
    result = evaluator.summarize()
    for group in ("All", "Things", "Stuff"):
        assert result[group]["pq"] == result[group]["sq"] == result[group]["rq"] == 1.0


def test_postprocessor_output_evaluates(gt, tmp_path):
    """PostProcessPanoptic's dicts (segment ids from 0, 'isthing') go straight into the evaluator; masks equal
    to the ground truth give PQ 100."""
    ann_file, folder, images, categories = gt
    num_classes = max(categories) + 1
    post = PostProcessPanoptic(datasets.get_is_thing_map(datasets.build_dataset("val", _dataset_args(ann_file))))
    evaluator = PanopticEvaluator(ann_file, folder, output_dir=tmp_path / "eval")
    for image_id, (id_map, segments) in images.items():
        masks = torch.stack([torch.from_numpy(id_map == s["id"]) for s in segments]).float()
        logits = torch.full((len(segments) + 1, num_classes + 1), -10.0)
        for q, s in enumerate(segments):
            logits[q, s["category_id"]] = 10.0
        logits[-1, -1] = 10.0  # one no-object query
        outputs = {"pred_logits": logits[None], "pred_masks": torch.cat([masks, torch.zeros_like(masks[:1])])[None]
                   * 20 - 10}
        (pred,) = post(outputs, [id_map.shape])
        assert len(pred["segments_info"]) == len(segments)
        evaluator.update([dict(pred, image_id=image_id, file_name=f"{image_id:012d}.png")])
    result = evaluator.summarize()
    assert result["All"]["pq"] == 1.0


def _dataset_args(ann_file: Path):
    from argparse import Namespace

    root = ann_file.parent.parent
    return Namespace(dataset_file="coco_panoptic", coco_path=str(root), coco_panoptic_path=str(root), masks=True,
                     num_classes=None)


def test_subset_of_images_is_scored_alone(gt, tmp_path):
    ann_file, folder, _, _ = gt
    predictions = _hand_made(gt)[1:3]
    evaluator = PanopticEvaluator(ann_file, folder, output_dir=tmp_path / "eval")
    evaluator.update(predictions)
    result = evaluator.summarize()
    data = json.loads(ann_file.read_text())
    kept = {p["image_id"] for p in predictions}
    data["images"] = [i for i in data["images"] if i["id"] in kept]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    (tmp_path / "gt.json").write_text(json.dumps(data))
    pred_json = _write_predictions(tmp_path / "direct", predictions)
    _assert_same(result, _reference(tmp_path / "gt.json", pred_json, folder, tmp_path / "direct"))


def test_group_without_segments_reports_zero(gt, tmp_path):
    ann_file, folder, images, categories = gt
    # ground truth and predictions with the stuff segments removed (left unlabelled)
    data = json.loads(ann_file.read_text())
    for ann in data["annotations"]:
        ann["segments_info"] = [s for s in ann["segments_info"] if categories[s["category_id"]]["isthing"]]
    (tmp_path / "gt.json").write_text(json.dumps(data))
    predictions = []
    for ann in data["annotations"]:
        id_map = images[ann["image_id"]][0]
        kept = [s["id"] for s in ann["segments_info"]]
        predictions.append(_prediction(ann["image_id"], np.where(np.isin(id_map, kept), id_map, 0),
                                       [{"id": i, "category_id": s["category_id"]}
                                        for i, s in zip(kept, ann["segments_info"])]))
    evaluator = PanopticEvaluator(tmp_path / "gt.json", folder, output_dir=tmp_path / "eval")
    evaluator.update(predictions)
    # the ground-truth PNGs still hold stuff ids that the trimmed JSON does not list: panopticapi ignores them
    result = evaluator.summarize()
    assert result["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert result["Things"]["pq"] == 1.0 and result["Things"]["n"] == 3


def test_bad_predictions_fail_clearly(gt, tmp_path):
    ann_file, folder, _, _ = gt
    with pytest.raises(ValueError, match="no predictions"):
        PanopticEvaluator(ann_file, folder, output_dir=tmp_path / "empty").summarize()
    bad = _hand_made(gt)
    bad[0]["segments_info"] = bad[0]["segments_info"][1:]  # a PNG segment the JSON does not list
    evaluator = PanopticEvaluator(ann_file, folder, output_dir=tmp_path / "eval")
    evaluator.update(bad)
    with pytest.raises(ValueError, match="presented in PNG and not presented in JSON"):
        evaluator.summarize()
    unknown = _hand_made(gt)
    unknown[0]["image_id"] = 424242
    evaluator = PanopticEvaluator(ann_file, folder, output_dir=tmp_path / "unknown")
    evaluator.update(unknown)
    with pytest.raises(ValueError, match="does not annotate, e.g. image_id 424242"):
        evaluator.summarize()


def _distributed_worker(rank, store, ann_file, folder, output_dir, predictions, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        evaluator = PanopticEvaluator(ann_file, folder, output_dir=output_dir)
        evaluator.update(predictions)
        evaluator.synchronize_between_processes()
        queue.put((rank, evaluator.summarize()))
    except Exception as e:  # reported to the test rather than left to a timeout
        queue.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_distributed_results_are_merged(gt, tmp_path):
    ann_file, folder, images, _ = gt
    predictions = _hand_made(gt)
    # rank 1 also sees image 0 again (a sampler's padding), with another prediction: the first copy counts
    padded = dict(predictions[1], image_id=predictions[0]["image_id"], file_name=predictions[0]["file_name"])
    shards = [predictions[0::2], predictions[1::2] + [padded]]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_distributed_worker, args=(rank, tmp_path / "store", ann_file, folder,
                                                                 tmp_path / "eval", shards[rank], queue))
               for rank in range(2)]
    for w in workers:
        w.start()
    results = dict(queue.get(timeout=60) for _ in workers)
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    assert all(isinstance(r, dict) for r in results.values()), results
    pred_json = _write_predictions(tmp_path / "direct", predictions)
    reference = _reference(ann_file, pred_json, folder, tmp_path / "direct")
    _assert_same(results[0], reference)
    assert results[1] == results[0]  # every process gets the summary
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted(
        [p["file_name"] for p in predictions] + ["predictions.json"])


def test_segm_ap_of_hand_made_masks_equals_pycocotools(generated, capsys):
    """Mask AP during panoptic training: masks scored against the panoptic dataset's detection annotations."""
    dataset = datasets.build_dataset("val", _dataset_args(generated / "annotations" / "panoptic_val2017.json"))
    dataset.transforms = None
    coco_gt = datasets.get_coco_api_from_dataset(dataset)
    rng = np.random.default_rng(0)
    predictions, results = {}, []
    for index, image_id in enumerate(dataset.ids):
        _, target = dataset[index]
        things = [k for k, label in enumerate(target["labels"].tolist()) if dataset.is_thing_map[label]]
        masks = target["masks"][things].numpy()
        labels = target["labels"][things].tolist()
        masks[0, : masks.shape[1] // 2] = False  # one half-erased mask
        if len(labels) > 1:
            labels[1] = labels[1] % 3 + 1  # one wrong class
        masks = np.concatenate([masks, masks[:1, ::-1]])  # and a spurious flipped copy
        labels.append(labels[0])
        scores = rng.uniform(0.1, 1.0, size=len(labels)).tolist()
        predictions[image_id] = {"scores": torch.tensor(scores), "labels": torch.tensor(labels),
                                 "boxes": torch.zeros(len(labels), 4),
                                 "masks": torch.from_numpy(masks.copy())[:, None].to(torch.uint8)}
        for mask, label, score in zip(masks, labels, scores):
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            results.append({"image_id": image_id, "category_id": label, "segmentation": rle, "score": score})

    evaluator = CocoEvaluator(coco_gt, ["segm"])
    evaluator.update(predictions)
    evaluator.accumulate()
    evaluator.summarize()
    direct_gt = copy.deepcopy(coco_gt)
    direct = COCOeval(direct_gt, direct_gt.loadRes(results), iouType="segm")
    direct.params.imgIds = sorted(predictions)
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    capsys.readouterr()
    assert 0.1 < direct.stats[0] < 0.9
    np.testing.assert_array_equal(evaluator.coco_eval["segm"].stats, direct.stats)
