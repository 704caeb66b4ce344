"""Segmentation through main.py: the two-stage panoptic run (box model, then the mask head on it, frozen), PQ logged
and reproduced by --eval --resume, stage two really frozen, dataset metadata in the checkpoint, and clear errors.
How --two_stage splits, runs and resumes its stages (without training): tests/test_two_stage.py."""
import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
import torch

import datasets
import main as detr_main
import models.detr
from datasets import recipes, synthetic
from engine import train_one_epoch
from models import build_model
from models.segmentation import PostProcessPanoptic
from util.checkpoint import save_checkpoint
from util.nested_tensor import collate_fn

evaluation = pytest.importorskip("panopticapi.evaluation", reason="panoptic evaluation needs panopticapi-lite")

# the smallest model the mask head accepts (hidden_dim a multiple of 128, 8 heads); 64-px images
TINY = ["--hidden_dim", "128", "--nheads", "8", "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "64",
        "--num_queries", "8", "--batch_size", "4", "--num_workers", "0", "--warmup_iters", "0", "--epochs", "1",
        "--lr_drop", "5", "--scales", "64", "--max_size", "80", "--val_size", "64"]


def run(argv):
    return detr_main.main(detr_main.parse_args(argv))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("synthetic") / "data", seed=3, num_train=8, num_val=4,
                              image_size=64)


@pytest.fixture(scope="module")
def two_stage(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("panoptic")
    # panoptic post-processing keeping every query that is not no-object (the original keeps scores above 0.85): an
    # untrained model then still makes non-empty PNGs, so the PQ below is computed from real segments
    argv = ["--dataset_file", "synthetic_panoptic", "--coco_path", str(data_dir), "--output_dir", str(out),
            "--panoptic_threshold", "0"] + TINY
    stats = run(argv)
    return out, argv, stats


def _reference_pq(data_dir: Path, pred_dir: Path) -> dict:
    """panopticapi's own pq_compute on the files the run wrote."""
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluation.pq_compute(str(data_dir / "annotations" / "panoptic_val2017.json"),
                                     str(pred_dir / "predictions.json"),
                                     gt_folder=str(data_dir / "annotations" / "panoptic_val2017"),
                                     pred_folder=str(pred_dir))


def test_two_stages_write_pngs_and_json_that_panopticapi_reads_and_log_pq(two_stage, data_dir):
    out, _, stats = two_stage
    # stage one: a box model of things and stuff, box AP against the detection annotations (things only)
    box_log = [json.loads(line) for line in (out / "box" / "log.txt").read_text().splitlines()]
    assert len(box_log[-1]["test_coco_eval_bbox"]) == 12 and "test_PQ_all" not in box_log[-1]
    box_ckpt = torch.load(out / "box" / "checkpoint.pth", weights_only=True)
    assert not box_ckpt["args"]["masks"] and box_ckpt["model"]["class_embed.weight"].shape[0] == 7  # 5 ids + 0 + none

    # stage two: the original's log fields, and panopticapi reads the files
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()][-1]
    for key in ("test_PQ_all", "test_PQ_th", "test_PQ_st"):
        assert set(log[key]) == {"pq", "sq", "rq", "n"}
    assert (log["test_PQ_all"]["n"], log["test_PQ_th"]["n"], log["test_PQ_st"]["n"]) == (5, 3, 2)
    assert len(log["test_coco_eval_bbox"]) == 12 and len(log["test_coco_eval_masks"]) == 12
    assert stats["PQ_all"] == log["test_PQ_all"]

    pred_dir = out / "panoptic_eval"
    predictions = json.loads((pred_dir / "predictions.json").read_text())["annotations"]
    assert sorted(p["image_id"] for p in predictions) == list(range(1_000_001, 1_000_005))
    assert all((pred_dir / p["file_name"]).is_file() for p in predictions)
    assert sum(len(p["segments_info"]) for p in predictions) > 0  # real segments were scored
    reference = _reference_pq(data_dir, pred_dir)
    for name, key in (("All", "test_PQ_all"), ("Things", "test_PQ_th"), ("Stuff", "test_PQ_st")):
        assert log[key]["n"] == reference[name]["n"]
        for metric in ("pq", "sq", "rq"):
            assert log[key][metric] == pytest.approx(reference[name][metric], abs=1e-12), (name, metric)


def test_checkpoints_carry_the_dataset_metadata(two_stage):
    out, _, _ = two_stage
    names = {1: "ellipse", 2: "rectangle", 3: "triangle", 4: "sky", 5: "ground"}
    for path in (out / "box" / "checkpoint.pth", out / "checkpoint.pth"):
        ckpt_args = torch.load(path, weights_only=True)["args"]
        assert ckpt_args["category_names"] == names
        assert ckpt_args["thing_ids"] == [1, 2, 3]
    ckpt_args = torch.load(out / "checkpoint.pth", weights_only=True)["args"]
    assert ckpt_args["masks"] and ckpt_args["frozen_weights"] == str(out / "box" / "checkpoint.pth")
    # the panoptic post-processor from the checkpoint's args alone: its thing map is the dataset's categories
    _, _, postprocessors = build_model(detr_main.argparse.Namespace(**dict(ckpt_args, device="cpu")))
    assert postprocessors["panoptic"].is_thing_map == {1: True, 2: True, 3: True, 4: False, 5: False}


def test_the_runs_leave_the_panoptic_post_processor_unpatched(two_stage):
    # the low threshold of these runs comes from their command line: later tests build the real post-processor
    assert models.detr.PostProcessPanoptic is PostProcessPanoptic


def test_stage_two_kept_stage_one_frozen(two_stage):
    out, _, _ = two_stage
    box = torch.load(out / "box" / "checkpoint.pth", weights_only=True)["model"]
    segm = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    for k, v in box.items():
        assert torch.equal(segm[f"detr.{k}"], v), k


def test_eval_resume_reproduces_the_logged_pq(two_stage, tmp_path, caplog):
    out, argv, _ = two_stage
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()][-1]
    argv = [a if a != str(out) else str(tmp_path) for a in argv]
    with caplog.at_level(logging.INFO):
        stats = run(argv + ["--masks", "--eval", "--resume", str(out / "checkpoint.pth")])
    assert "Dataset defaults for synthetic_panoptic (flags you did not set): --backbone resnet18" in caplog.text
    assert "categories: 3 things, 2 stuff (from the dataset)" in caplog.text
    for key in ("PQ_all", "PQ_th", "PQ_st"):
        assert stats[key] == pytest.approx(log[f"test_{key}"], abs=1e-9), key
    assert stats["coco_eval_masks"] == pytest.approx(log["test_coco_eval_masks"], abs=1e-9)
    assert (tmp_path / "panoptic_eval" / "predictions.json").is_file()


def test_a_training_step_of_stage_two_moves_only_the_mask_head(data_dir, tmp_path):
    """After one step every detr.* parameter and buffer (batch-norm statistics included) is unchanged and every
    parameter of the mask head moved."""
    args = detr_main.parse_args(["--dataset_file", "synthetic_panoptic", "--coco_path", str(data_dir), "--masks",
                                 "--frozen_weights", "unused.pth", "--device", "cpu"] + TINY)
    recipes.apply_dataset_recipe(args)
    args.num_classes = 6
    dataset = synthetic.build_panoptic("train", args)
    datasets.set_dataset_metadata(args, dataset)
    model, criterion, _ = build_model(args)
    assert args.backbone_norm == "bn"  # batch-norm statistics that a training-mode forward would update
    optimizer = detr_main.build_optimizer(model, args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(4)), batch_size=4,
                                         collate_fn=collate_fn)
    train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), epoch=0, max_norm=0.1)
    after = model.state_dict()
    detr_keys = [k for k in before if k.startswith("detr.")]
    assert any("running_mean" in k for k in detr_keys)
    changed = [k for k in detr_keys if not torch.equal(before[k], after[k])]
    assert changed == []
    head = [n for n, _ in model.named_parameters() if not n.startswith("detr.")]
    assert head and all(n.startswith(("bbox_attention.", "mask_head.")) for n in head)
    # the key bias adds the same logit to every pixel of a query's softmax: its gradient is zero, it cannot move
    unmoved = [n for n in head if torch.equal(before[n], after[n]) and n != "bbox_attention.k_linear.bias"]
    assert unmoved == []
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(head)


def _box_checkpoint(path: Path, argv: list[str], **recorded) -> Path:
    """An untrained box model's checkpoint, as main.py writes it (weights + plain args); ``recorded`` edits the
    args it records."""
    args = detr_main.parse_args(argv)
    recipes.apply_dataset_recipe(args)
    args.num_classes = 6
    model, _, _ = build_model(args)
    save_checkpoint({"model": model.state_dict(), "args": dict(vars(args), **recorded)}, str(path))
    return path


def test_frozen_weights_of_another_architecture_list_what_differs(data_dir, tmp_path):
    base = ["--dataset_file", "synthetic_panoptic", "--coco_path", str(data_dir), "--device", "cpu"] + TINY
    # other layer counts (keys differ) and another position embedding (same keys, another model)
    ckpt = _box_checkpoint(tmp_path / "box.pth", base + ["--no-two_stage", "--enc_layers", "2"])
    with pytest.raises(ValueError) as err:
        run(base + ["--masks", "--frozen_weights", str(ckpt), "--position_embedding", "learned"])
    message = str(err.value)
    assert f"--frozen_weights {ckpt} was trained with another architecture" in message
    assert "--enc_layers: checkpoint 2, this run 1" in message
    assert "--position_embedding: checkpoint 'sine', this run 'learned'" in message
    assert "model keys missing from the checkpoint" in message  # load_model_state's listing too
    # the same keys and shapes, another model (a DC5 backbone): refused all the same
    ckpt = _box_checkpoint(tmp_path / "dc5.pth", base + ["--no-two_stage"], dilation=True)
    with pytest.raises(ValueError) as err:
        run(base + ["--masks", "--frozen_weights", str(ckpt)])
    assert str(err.value).splitlines()[1:] == ["  --dilation: checkpoint True, this run False"]


@pytest.mark.parametrize("extra, message", [
    (["--masks", "--hidden_dim", "64"], "GroupNorm.8. layers need --hidden_dim a multiple of 128"),
    (["--masks", "--nheads", "4"], "--nheads a multiple of 8"),
    (["--two_stage", "--eval"], "--two_stage trains both stages from scratch; it cannot be combined with --eval"),
    (["--output_dir", ""], "--two_stage needs --output_dir"),
])
def test_refused_before_anything_runs(data_dir, extra, message):
    with pytest.raises(SystemExit, match=message):
        run(["--dataset_file", "synthetic_panoptic", "--coco_path", str(data_dir)] + TINY + extra)
