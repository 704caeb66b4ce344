"""--two_stage (util/two_stage.py): each stage's arguments and recipe, both stages run through main.main, and a
run that goes on where it stopped (each stage resumes from its own folder's checkpoint.pth; a finished stage is not
rerun). The stages' runs are replaced by a recorder: tests/test_panoptic_training.py trains them for real."""
import json
import logging
from pathlib import Path

import main as detr_main
from datasets import recipes
from util.checkpoint import save_checkpoint
from util.two_stage import logged_test_stats, stage_args, two_stages_apply


def run(argv):
    return detr_main.main(detr_main.parse_args(argv))


def test_stage_arguments_take_each_stage_recipe():
    args = detr_main.parse_args(["--dataset_file", "synthetic_panoptic", "--output_dir", "out", "--epochs", "2"])
    recipes.apply_dataset_recipe(args)
    assert args.two_stage and args.backbone_last_layer == "layer3"
    assert two_stages_apply(args)
    box = stage_args(args, two_stage=False, output_dir="out/box")
    recipes.apply_dataset_recipe(box)
    assert not two_stages_apply(box) and not box.masks
    assert box.epochs == 2 and box.lr_drop == recipes.SYNTHETIC_PANOPTIC_RECIPE["lr_drop"]
    masks = stage_args(args, two_stage=False, masks=True, frozen_weights="out/box/checkpoint.pth")
    recipes.apply_dataset_recipe(masks)
    assert masks.masks and masks.output_dir == "out" and masks.epochs == 2  # given: both stages
    assert masks.lr_drop == recipes.SYNTHETIC_PANOPTIC_MASK_RECIPE["lr_drop"]  # the stage-two recipe
    assert masks.hidden_dim == recipes.SYNTHETIC_PANOPTIC_RECIPE["hidden_dim"]
    # the same from a Namespace built without parse_args (no record of the flags given)
    plain = detr_main.get_args_parser().parse_args(["--dataset_file", "synthetic_panoptic", "--output_dir", "out"])
    recipes.apply_dataset_recipe(plain)
    masks = stage_args(plain, two_stage=False, masks=True, frozen_weights="x")
    recipes.apply_dataset_recipe(masks)
    assert masks.epochs == recipes.SYNTHETIC_PANOPTIC_MASK_RECIPE["epochs"] and not masks.two_stage
    # one stage asked for: --two_stage (the dataset's default) does not apply
    one = detr_main.parse_args(["--dataset_file", "synthetic_panoptic", "--masks", "--frozen_weights", "x"])
    recipes.apply_dataset_recipe(one)
    assert not two_stages_apply(one)


def test_two_stages_run_main_twice(monkeypatch, caplog, tmp_path):
    monkeypatch.chdir(tmp_path)  # each stage's console.log goes into its own (relative) folder
    calls = []
    monkeypatch.setattr(detr_main, "run", lambda args: calls.append(args) or {"stage": len(calls)})
    with caplog.at_level(logging.INFO):
        stats = run(["--dataset_file", "synthetic_panoptic", "--output_dir", "out", "--device", "cpu"])
    assert stats == {"stage": 2}
    assert "Two stages: 1. the box model into out/box; 2. the mask head on it, frozen, into out" in caplog.text
    box, masks = calls
    assert (box.output_dir, box.masks, box.frozen_weights) == ("out/box", False, None)
    assert (masks.output_dir, masks.masks, masks.frozen_weights) == ("out", True, "out/box/checkpoint.pth")
    assert box.epochs == recipes.SYNTHETIC_PANOPTIC_RECIPE["epochs"]
    assert masks.epochs == recipes.SYNTHETIC_PANOPTIC_MASK_RECIPE["epochs"]
    # each stage's run logs into its own folder (console.log; args.json and tensorboard/ come from run() likewise)
    for folder in (tmp_path / "out" / "box", tmp_path / "out"):
        assert "Not using distributed mode" in (folder / "console.log").read_text()


def test_logged_test_stats_are_the_last_evaluated_epochs(tmp_path):
    """--eval_every: the last lines of a log.txt may have no test_* keys; the stats are the last evaluation's."""
    lines = [{"epoch": 0, "test_PQ_all": {"pq": 0.25}}, {"epoch": 1, "test_PQ_all": {"pq": 0.5}, "train_loss": 1.0},
             {"epoch": 2, "train_loss": 0.5}]
    (tmp_path / "log.txt").write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    assert logged_test_stats(tmp_path / "log.txt") == {"PQ_all": {"pq": 0.5}}
    assert logged_test_stats(tmp_path / "nope.txt") == {}


def test_two_stages_resume_the_stage_they_were_in_and_skip_a_finished_one(monkeypatch, tmp_path):
    """Run again (or requeued), --two_stage resumes each stage from its own folder's checkpoint.pth (stage 1 in
    OUTPUT_DIR/box, stage 2 in OUTPUT_DIR) and does not rerun a stage whose checkpoint reached its last epoch."""
    calls = []
    monkeypatch.setattr(detr_main, "run", lambda args: calls.append(args) or {"stage": len(calls)})
    out, box = tmp_path, tmp_path / "box"
    box.mkdir()
    box_epochs = recipes.SYNTHETIC_PANOPTIC_RECIPE["epochs"]
    mask_epochs = recipes.SYNTHETIC_PANOPTIC_MASK_RECIPE["epochs"]
    argv = ["--dataset_file", "synthetic_panoptic", "--output_dir", str(out), "--device", "cpu"]

    def checkpoint(folder: Path, epoch: int, epochs: int) -> None:
        save_checkpoint({"model": {}, "epoch": epoch, "args": {"epochs": epochs}}, str(folder / "checkpoint.pth"))

    # requeued in stage 1: stage 1 continues from its checkpoint, stage 2 starts
    checkpoint(box, 2, box_epochs)
    run(argv)
    assert [(a.output_dir, a.masks, a.resume) for a in calls] == [
        (str(box), False, str(box / "checkpoint.pth")), (str(out), True, "")]
    # requeued in stage 2: stage 1 is done, stage 2 continues from its own checkpoint (into a model with masks)
    calls.clear()
    checkpoint(box, box_epochs - 1, box_epochs)
    checkpoint(out, 1, mask_epochs)
    assert run(argv) == {"stage": 1}
    assert [(a.output_dir, a.masks, a.resume, a.frozen_weights) for a in calls] == [
        (str(out), True, str(out / "checkpoint.pth"), str(box / "checkpoint.pth"))]
    # both done: nothing runs; the stats are stage 2's last logged ones
    calls.clear()
    checkpoint(out, mask_epochs - 1, mask_epochs)
    (out / "log.txt").write_text(json.dumps({"epoch": mask_epochs - 1, "test_PQ_all": {"pq": 0.5}}) + "\n")
    assert run(argv) == {"PQ_all": {"pq": 0.5}} and calls == []
    # --epochs given: a stage trains to it (the resumed schedule is the command line's)
    run(argv + ["--epochs", str(mask_epochs + 1)])
    assert [(a.output_dir, a.resume) for a in calls] == [(str(out), str(out / "checkpoint.pth"))]
