"""Multi-process behaviour with two real gloo processes on 127.0.0.1, checked against single-process values."""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_args

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str, fn, extra):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        result = fn(rank, extra)
        torch.save(result, Path(out_dir) / f"rank{rank}.pth")
        dist.barrier()  # both ranks done before either tears down (as main.main; once, one rank aborted in gloo)
    finally:
        dist.destroy_process_group()


def run_two_processes(fn, tmp_path: Path, extra=None) -> list:
    """Run fn(rank, extra) in two gloo processes; returns what each rank returned (rank order)."""
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), fn, extra), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in range(WORLD_SIZE)]


def _collectives(rank, _):
    from util.dist import reduce_dict
    from util.logger import MetricLogger

    reduced = reduce_dict({"a": torch.tensor(float(rank + 1)), "b": torch.tensor(10.0 * (rank + 1))})
    summed = reduce_dict({"a": torch.tensor(float(rank + 1))}, average=False)
    logger = MetricLogger()
    for v in ([1.0, 2.0] if rank == 0 else [3.0]):
        logger.update(loss=v)
    logger.synchronize_between_processes()
    return {"reduced": {k: v.item() for k, v in reduced.items()}, "summed": summed["a"].item(),
            "loss_avg": logger.loss.global_avg, "loss_count": logger.loss.count}


def test_reduce_dict_and_metric_logger(tmp_path):
    results = run_two_processes(_collectives, tmp_path)
    for r in results:
        assert r["reduced"] == {"a": 1.5, "b": 15.0} and r["summed"] == 3.0
        assert r["loss_avg"] == 2.0 and r["loss_count"] == 3  # as one process with the values [1, 2, 3]


def _criterion_inputs():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 5, 5), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.25}
    targets = [{"labels": torch.tensor([0, 3, 1]), "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .7, .3, .4],
                                                                           [.5, .5, .1, .1]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[.5, .5, .5, .5]])}]
    return outputs, targets


def _criterion(rank, _):
    from models import build_model

    _, criterion, _ = build_model(tiny_args(aux_loss=False))
    outputs, targets = _criterion_inputs()
    mine = {k: v[rank:rank + 1] for k, v in outputs.items()}
    return {k: v.item() for k, v in criterion(mine, [targets[rank]]).items()}


def test_num_boxes_is_averaged_across_processes(tmp_path):
    from models import build_model

    results = run_two_processes(_criterion, tmp_path)
    _, criterion, _ = build_model(tiny_args(aux_loss=False))
    outputs, targets = _criterion_inputs()
    counts = [len(t["labels"]) for t in targets]
    for rank, result in enumerate(results):
        alone = criterion({k: v[rank:rank + 1] for k, v in outputs.items()}, [targets[rank]])
        # alone, the box losses are divided by this image's boxes; together by the average over processes
        for k in ("loss_bbox", "loss_giou"):
            expected = alone[k].item() * counts[rank] / (sum(counts) / WORLD_SIZE)
            assert result[k] == pytest.approx(expected, rel=1e-6), (rank, k)
        assert result["loss_ce"] == pytest.approx(alone["loss_ce"].item(), rel=1e-6)


def _gt_and_predictions():
    images = [{"id": i, "width": 100, "height": 80, "file_name": f"{i}.jpg"} for i in range(1, 7)]
    annotations, predictions = [], {}
    g = torch.Generator().manual_seed(0)
    for img in images:
        for k in range(2):
            x, y = torch.randint(0, 50, (2,), generator=g).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": img["id"], "category_id": 1 + k,
                                "bbox": [x, y, 30, 25], "area": 750.0, "iscrowd": 0})
        boxes = torch.tensor([[a["bbox"][0] + 2.0, a["bbox"][1] - 1.0, a["bbox"][0] + 31.0, a["bbox"][1] + 26.0]
                              for a in annotations[-2:]] + [[5.0, 5.0, 40.0, 40.0]])
        predictions[img["id"]] = {"boxes": boxes, "labels": torch.tensor([1, 2, 1]),
                                  "scores": torch.rand(3, generator=g)}
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    return data, predictions


def _evaluate(rank, _):
    from datasets.coco import coco_from_dict
    from datasets.coco_eval import CocoEvaluator

    data, predictions = _gt_and_predictions()
    evaluator = CocoEvaluator(coco_from_dict(data), ["bbox"])
    ids = sorted(predictions)
    mine = ids[rank::WORLD_SIZE] + ([ids[0]] if rank == 1 else [])  # a DistributedSampler-style padded duplicate
    for image_id in mine:
        evaluator.update({image_id: predictions[image_id]})
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.coco_eval["bbox"].stats.tolist() if rank == 0 else None


def test_evaluator_merge_equals_one_process(tmp_path):
    from datasets.coco import coco_from_dict
    from datasets.coco_eval import CocoEvaluator

    merged = run_two_processes(_evaluate, tmp_path)[0]
    data, predictions = _gt_and_predictions()
    evaluator = CocoEvaluator(coco_from_dict(data), ["bbox"])
    evaluator.update(predictions)
    evaluator.accumulate()
    evaluator.summarize()
    assert merged == evaluator.coco_eval["bbox"].stats.tolist()
    assert merged[0] > 0.1  # the detections are good enough that the comparison means something


def _prepare(rank, data_root):
    from argparse import Namespace

    import datasets
    from datasets import synthetic
    from util.dist import local_main_first

    os.environ["DETR_DATA_DIR"] = data_root
    calls = []
    real_generate = synthetic.generate

    def small_generate(out_dir, seed=0, **kwargs):
        calls.append(rank)
        return real_generate(out_dir, seed=seed, num_train=4, num_val=2, image_size=48)

    synthetic.generate = small_generate
    with local_main_first():
        datasets.prepare(Namespace(dataset_file="synthetic"))
    root = synthetic.default_cache_dir()
    return {"generated": calls, "ready": (root / "annotations" / "instances_val2017.json").is_file()}


def test_synthetic_data_is_generated_once_per_node(tmp_path):
    results = run_two_processes(_prepare, tmp_path, extra=str(tmp_path / "data"))
    assert results[0] == {"generated": [0], "ready": True}
    assert results[1] == {"generated": [], "ready": True}  # waited, then found it


def _backbone_weights(rank, weights_path):
    from models import build_model, loader

    args = tiny_args(backbone_weights=weights_path, seed=rank)
    args.distributed = True
    torch.manual_seed(rank)  # different random initialisations on the two processes
    model, _, _ = build_model(args)
    loaded = []
    import models.backbone

    real_load = models.backbone.load_backbone_weights

    def recording_load(backbone, spec):
        loaded.append(rank)
        return real_load(backbone, spec)

    loader.load_backbone_weights = recording_load
    loader.load_initial_weights(args, model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    body = ddp.module.backbone[0].body
    return {"loaded": loaded, "conv1": body.conv1.weight.detach().clone(),
            "bn_mean": body.layer1[0].bn1.running_mean.clone(), "head": ddp.module.class_embed.weight.detach()}


def test_backbone_weights_are_read_by_the_main_process_and_broadcast(tmp_path):
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer1.0.bn1.running_mean"] = torch.arange(64, dtype=torch.float32)
    torch.save(state, tmp_path / "r18.pth")
    results = run_two_processes(_backbone_weights, tmp_path, extra=str(tmp_path / "r18.pth"))
    assert results[0]["loaded"] == [0] and results[1]["loaded"] == []
    for r in results:
        assert torch.equal(r["conv1"], state["conv1.weight"])
        assert torch.equal(r["bn_mean"], state["layer1.0.bn1.running_mean"])  # buffers too
    assert torch.equal(results[0]["head"], results[1]["head"])  # DDP synchronised the whole model




# gradient accumulation: object counts of 8 images, 4 per process. The processes hold different numbers of boxes
# (9 and 8) but, one image having more objects than the 5 queries, the same number of matched queries (8), so the
# same class-weight sum: DDP's average of the two processes' class-loss means is then the mean over all 8 images.
# Within each process the two micro-batches differ in both.
COUNTS = [0, 1, 2, 6, 3, 1, 2, 2]


def _accumulate(rank, _):
    from test_engine import _detection_batch, _one_step

    mine = _detection_batch(COUNTS)[4 * rank: 4 * rank + 4]
    grads, _, all_reduces = _one_step([mine[:2], mine[2:]], 2, 0, ddp=True)  # --accum_steps 2: 2 micro-batches of 2
    return {"grads": grads, "all_reduces": all_reduces}


def test_accumulated_micro_batches_on_two_processes_step_like_one_batch_of_8(tmp_path):
    """2 processes x 2 micro-batches of 2 (--accum_steps 2) give the gradients of 1 process x batch 8 (and so of
    2 processes x batch 4): the box normaliser is the whole batch's, averaged across processes, and the class loss
    is each process's weighted mean over its 2 micro-batches (as the original's over its batch)."""
    from test_engine import _detection_batch, _one_step

    results = run_two_processes(_accumulate, tmp_path)
    expected = _one_step([_detection_batch(COUNTS)], 1, 0)[0]
    assert expected.keys() == results[0]["grads"].keys() and len(expected) > 20
    for r in results:
        for name, g in expected.items():
            assert (r["grads"][name] - g).abs().max().item() <= 1e-5 * max(1.0, g.abs().max().item()), name
        # DDP all-reduced the gradients in the second micro-batch's backward only (no_sync for the first)
        assert r["all_reduces"] and set(r["all_reduces"]) == {2}
