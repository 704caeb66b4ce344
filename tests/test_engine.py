"""End-to-end: tiny trainings through main.main on a small generated synthetic set, and the training loop's parts
(optimizer, clipping, warmup, lr drop, checkpoints, resume).

Module-scoped fixtures are read-only: a test that continues a run copies its checkpoint first.
"""
import json
import logging
import math
import re
import shutil

import pytest
import torch

import main as detr_main
from datasets import recipes
from datasets.synthetic import generate
from engine import NonFiniteLossError, train_one_epoch
from util import args as arguments
from util.nested_tensor import nested_tensor_from_tensor_list

from conftest import tiny_args

TINY = ["--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
        "--num_queries", "6", "--batch_size", "4", "--num_workers", "0", "--warmup_iters", "0",
        "--backbone_last_layer", "layer4", "--epochs", "1", "--lr_drop", "5"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate(root, seed=3, num_train=8, num_val=4, image_size=64)
    return root


def run(argv):
    return detr_main.main(detr_main.parse_args(argv))


def with_flag(argv: list[str], flag: str, value=None) -> list[str]:
    """argv with --flag set to value (replaced when present, appended otherwise); value None removes the flag."""
    out = list(argv)
    if flag in out:
        i = out.index(flag)
        del out[i:i + 2]
    return out + ([flag, str(value)] if value is not None else [])


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = ["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--output_dir", str(out)] + TINY
    stats = run(argv)
    return out, argv, stats


def continued(trained, tmp_path):
    """A copy of the trained run's output folder, and its argv writing there."""
    out, argv, _ = trained
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    return tmp_path, with_flag(argv, "--output_dir", tmp_path)


def test_one_epoch_writes_checkpoint_log_and_eval(trained, caplog):
    out, _, stats = trained
    assert (out / "checkpoint.pth").is_file()
    assert (out / "eval" / "latest.pth").is_file()
    lines = (out / "log.txt").read_text().splitlines()
    assert len(lines) == 1
    log = json.loads(lines[0])
    assert log["epoch"] == 0 and len(log["test_coco_eval_bbox"]) == 12
    assert log["test_coco_eval_bbox"] == stats["coco_eval_bbox"]
    assert math.isfinite(log["train_loss"])
    # plain types only: readable without unpickling arbitrary objects
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "epoch", "args"}
    assert ckpt["epoch"] == 0 and ckpt["args"]["hidden_dim"] == 32
    ev = torch.load(out / "eval" / "latest.pth", weights_only=True)
    assert ev["precision"].ndim == 5
    assert not [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_start_prints_the_git_revision_and_the_recipe(data_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        run(["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--eval"] + TINY)
    assert "git: sha: " in caplog.text
    assert "Dataset defaults for synthetic (flags you did not set): --backbone resnet18" in caplog.text


def test_resume_continues_at_the_next_epoch_with_the_optimizer(trained, tmp_path, caplog):
    out, argv = continued(trained, tmp_path)
    before = torch.load(out / "checkpoint.pth", weights_only=True)
    with caplog.at_level(logging.INFO):
        run(with_flag(argv, "--epochs", 2) + ["--resume", str(out / "checkpoint.pth")])
    assert "restored model, optimizer, lr_scheduler, epoch (continuing at epoch 1)" in caplog.text
    assert "Epoch: [1]" in caplog.text and "Epoch: [0]" not in caplog.text
    logs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in logs] == [0, 1]
    after = torch.load(out / "checkpoint.pth", weights_only=True)
    assert after["epoch"] == 1
    # AdamW's step count went on from the restored state instead of restarting
    step_before = before["optimizer"]["state"][0]["step"]
    assert after["optimizer"]["state"][0]["step"] == 2 * step_before


@pytest.fixture(scope="module")
def dropped(data_dir, tmp_path_factory):
    """One epoch with --lr_drop 1 --lr_backbone 2e-4: the checkpoint's scheduler has already divided the lrs by 10."""
    out = tmp_path_factory.mktemp("dropped")
    argv = with_flag(["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--output_dir", str(out)] + TINY,
                     "--lr_drop", 1) + ["--lr", "4e-4", "--lr_backbone", "2e-4"]
    run(argv)
    return out, argv


def _lrs(path):
    return [g["lr"] for g in torch.load(path, weights_only=True)["optimizer"]["param_groups"]]


def test_resume_keeps_the_checkpoint_schedule_unless_the_command_line_overrides_it(dropped, tmp_path, caplog):
    out, argv = dropped
    assert _lrs(out / "checkpoint.pth") == pytest.approx([4e-5, 2e-5])
    shutil.copy(out / "checkpoint.pth", tmp_path / "start.pth")
    # resumed without repeating --lr_drop 1, --lr or --lr_backbone: the checkpoint's schedule goes on
    plain = [a for a in with_flag(with_flag(with_flag(argv, "--lr_drop"), "--lr"), "--lr_backbone")]
    plain = with_flag(with_flag(plain, "--output_dir", tmp_path / "kept"), "--epochs", 2)
    with caplog.at_level(logging.INFO):
        run(plain + ["--resume", str(tmp_path / "start.pth")])
    assert "keeping the checkpoint's lr_drop 1 (--lr_drop not given)" in caplog.text
    logs = [json.loads(line) for line in (tmp_path / "kept" / "log.txt").read_text().splitlines()]
    assert logs[-1]["epoch"] == 1 and logs[-1]["train_lr"] == pytest.approx(4e-5)
    kept = torch.load(tmp_path / "kept" / "checkpoint.pth", weights_only=True)
    assert kept["args"]["lr_drop"] == 1 and kept["lr_scheduler"]["step_size"] == 1
    assert _lrs(tmp_path / "kept" / "checkpoint.pth") == pytest.approx([4e-6, 2e-6])
    assert (tmp_path / "kept" / "checkpoint0001.pth").is_file()  # named after the checkpoint's lr_drop

    # flags given on the command line override it, and the log says which
    caplog.clear()
    override = with_flag(with_flag(plain, "--output_dir", tmp_path / "override"), "--lr_drop", 5) + ["--lr", "1e-4"]
    with caplog.at_level(logging.INFO):
        run(override + ["--resume", str(tmp_path / "start.pth")])
    assert "--lr 0.0001 from the command line overrides the checkpoint's 0.0004" in caplog.text
    assert "--lr_drop 5 from the command line overrides the checkpoint's 1" in caplog.text
    assert "keeping the checkpoint's lr_backbone 0.0002" in caplog.text
    logs = [json.loads(line) for line in (tmp_path / "override" / "log.txt").read_text().splitlines()]
    assert logs[-1]["train_lr"] == pytest.approx(1e-4)  # no drop before epoch 5
    assert _lrs(tmp_path / "override" / "checkpoint.pth") == pytest.approx([1e-4, 2e-4])


def test_a_scripts_namespace_overrides_the_schedule_with_the_flags_it_changed(dropped, tmp_path, caplog):
    out, argv = dropped
    shutil.copy(out / "checkpoint.pth", tmp_path / "start.pth")
    # the way the original's submitit script calls main: a Namespace of the parser, then the script's own values;
    # no record of what was typed, so the flags whose value differs from the parser's default count as given
    argv = with_flag(with_flag(with_flag(argv, "--output_dir", tmp_path / "prog"), "--lr_drop"), "--epochs")
    args = arguments.get_args_parser().parse_args(argv)
    args.epochs = 2
    args.resume = str(tmp_path / "start.pth")
    assert arguments.given_flags(args) >= {"epochs", "resume", "hidden_dim"}
    assert "lr_drop" not in arguments.given_flags(args)
    with caplog.at_level(logging.INFO):
        detr_main.main(args)
    assert "--epochs 2 from the command line overrides the checkpoint's 1" in caplog.text
    assert "keeping the checkpoint's lr_drop 1 (--lr_drop not given)" in caplog.text
    assert "Epoch: [1]" in caplog.text
    ckpt = torch.load(tmp_path / "prog" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["epochs"] == 2
    assert ckpt["lr_scheduler"]["step_size"] == 1 and ckpt["args"]["lr_drop"] == 1

    # a script that sets a flag to its default value says so in args.explicit_flags
    caplog.clear()
    args = arguments.get_args_parser().parse_args(with_flag(argv, "--output_dir", tmp_path / "listed"))
    args.resume = str(tmp_path / "start.pth")
    args.epochs = 2
    args.lr_drop = 200
    args.explicit_flags = sorted(arguments.given_flags(args) | {"lr_drop"})
    with caplog.at_level(logging.INFO):
        detr_main.main(args)
    assert "--lr_drop 200 from the command line overrides the checkpoint's 1" in caplog.text
    ckpt = torch.load(tmp_path / "listed" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["lr_scheduler"]["step_size"] == 200


def test_given_flags_is_one_rule_for_the_command_line_and_scripts():
    parsed = arguments.parse_args(["--dataset_file", "synthetic", "--lr", "1e-4"])
    assert arguments.given_flags(parsed) == {"dataset_file", "lr"}  # typed, even at the default value
    script = arguments.get_args_parser().parse_args(["--dataset_file", "synthetic"])
    assert arguments.given_flags(script) == {"dataset_file"}
    recipes.apply_dataset_recipe(script)
    assert arguments.given_flags(script) == {"dataset_file"}  # what the recipe filled is not given
    script.epochs = 500
    assert arguments.given_flags(script) == {"dataset_file", "epochs"}


def test_conflicting_starts_are_refused(trained, tmp_path):
    out, argv = continued(trained, tmp_path)
    with pytest.raises(SystemExit, match="--finetune .* cannot be combined with --resume"):
        run(argv + ["--finetune", str(out / "checkpoint.pth"), "--resume", str(out / "checkpoint.pth")])


def test_eval_resume_reproduces_the_logged_ap(trained, tmp_path):
    out, argv, _ = trained
    logs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    stats = run(with_flag(argv, "--output_dir", tmp_path) + ["--eval", "--resume", str(out / "checkpoint.pth")])
    assert stats["coco_eval_bbox"] == pytest.approx(logs[-1]["test_coco_eval_bbox"], abs=1e-6)
    assert (tmp_path / "eval.pth").is_file()


def test_resume_refuses_architecture_flags_given_against_the_checkpoint(trained, tmp_path, caplog):
    out, argv, _ = trained
    ckpt = out / "checkpoint.pth"
    assert torch.load(ckpt, weights_only=True)["args"]["backbone_blocks"] == 1  # the synthetic recipe's
    argv = with_flag(argv, "--output_dir", tmp_path) + ["--eval", "--resume", str(ckpt)]
    with pytest.raises(ValueError) as err:
        run(argv + ["--backbone_blocks", "0"])
    message = str(err.value)
    assert f"--resume {ckpt} was trained with other architecture flags than the ones given here" in message
    assert "--backbone_blocks: checkpoint 1, this run 0" in message
    # also a difference the weights do not show (2 instead of 4 heads: same parameter shapes)
    with pytest.raises(ValueError, match="--nheads: checkpoint 4, this run 2"):
        run(with_flag(argv, "--nheads", 2))


def _eval_argv(data_dir, ckpt, *flags):
    return ["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--num_workers", "0", "--batch_size", "4",
            "--eval", "--resume", str(ckpt), *flags]


def test_eval_resume_takes_the_checkpoints_architecture_and_size(trained, data_dir, tmp_path, caplog):
    out, argv, _ = trained
    # the same weights, recorded as trained and evaluated at 96 px (the recipe's 128 does not apply)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    ckpt["args"]["val_size"] = 96
    torch.save(ckpt, tmp_path / "ckpt.pth")
    with caplog.at_level(logging.INFO):
        stats = run(_eval_argv(data_dir, tmp_path / "ckpt.pth"))
    assert "From the checkpoint" in caplog.text and "--hidden_dim 32" in caplog.text and "--val_size 96" in caplog.text
    assert "number of classes: 4 (from the checkpoint)" in caplog.text
    explicit = run(with_flag(argv, "--output_dir") + ["--val_size", "96", "--eval", "--resume",
                                                      str(tmp_path / "ckpt.pth")])
    assert stats == explicit
    at_128 = run(with_flag(argv, "--output_dir") + ["--val_size", "128", "--eval", "--resume",
                                                    str(tmp_path / "ckpt.pth")])
    assert at_128["loss"] != stats["loss"]  # the size mattered
    # a size given against the checkpoint's: a warning, and the given size
    assert "--val_size 128: the checkpoint's run evaluated at --val_size 96" in caplog.text


def test_finetune_from_another_number_of_classes(trained, tmp_path, caplog):
    out, argv, _ = trained
    with caplog.at_level(logging.INFO):
        run(with_flag(argv, "--output_dir", tmp_path) + ["--num_classes", "9", "--finetune",
                                                         str(out / "checkpoint.pth")])
    assert "initialised: the class head (10 rows: 9 classes + no-object; the checkpoint's 5 rows are" in caplog.text
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["model"]["class_embed.weight"].shape[0] == 10 and ckpt["epoch"] == 0


def test_frozen_box_model_under_a_mask_head_and_segm_evaluation(data_dir, tmp_path):
    # the mask head's group norms need hidden_dim >= 128 and nheads 8, as in the original
    argv = ["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--output_dir", str(tmp_path / "box")]
    argv = with_flag(with_flag(argv + TINY, "--hidden_dim", 128), "--nheads", 8)
    run(argv)
    box = torch.load(tmp_path / "box" / "checkpoint.pth", weights_only=True)["model"]
    stats = run(with_flag(argv, "--output_dir", tmp_path / "segm")
                + ["--masks", "--frozen_weights", str(tmp_path / "box" / "checkpoint.pth")])
    assert len(stats["coco_eval_masks"]) == 12 and len(stats["coco_eval_bbox"]) == 12
    segm = torch.load(tmp_path / "segm" / "checkpoint.pth", weights_only=True)["model"]
    # stage one stayed frozen: every detr.* tensor is the box model's
    for k, v in box.items():
        assert torch.equal(segm[f"detr.{k}"], v), k
    assert any(k.startswith("mask_head.") for k in segm)
    log = json.loads((tmp_path / "segm" / "log.txt").read_text().splitlines()[-1])
    assert len(log["test_coco_eval_masks"]) == 12


def test_dataset_smaller_than_a_batch(data_dir, tmp_path):
    argv = ["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--output_dir", str(tmp_path)] + TINY
    stats = run(with_flag(argv, "--batch_size", 16))
    assert len(stats["coco_eval_bbox"]) == 12


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_fp16_scaler_state_round_trips_through_a_checkpoint(data_dir, tmp_path, caplog):
    argv = ["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--output_dir", str(tmp_path)] + TINY
    argv += ["--amp", "fp16"]
    run(argv)
    first = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert set(first["scaler"]) >= {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    with caplog.at_level(logging.INFO):
        run(with_flag(argv, "--epochs", 2) + ["--resume", str(tmp_path / "checkpoint.pth")])
    assert f"fp16 gradient scaler (scale {first['scaler']['scale']:g})" in caplog.text
    second = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    # 2 steps per epoch went on from the restored scale: halved per overflowing step, else the growth tracker counts
    # (a fresh scaler would have repeated the first epoch's evolution from 65536 and ended where it did)
    a, b = first["scaler"], second["scaler"]
    assert b["scale"] < a["scale"] or (b["scale"] == a["scale"] and b["_growth_tracker"] > a["_growth_tracker"])
    assert "scaler" not in torch.load(tmp_path / "checkpoint.pth", weights_only=True)["args"]


def test_bf16_training_step_is_finite_and_close_to_fp32():
    from util.amp import autocast, to_float

    torch.manual_seed(0)
    model, criterion, _ = detr_main.build_model(tiny_args())
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [{"labels": torch.tensor([0, 3]), "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .7, .3, .4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[.5, .5, .5, .5]])}]
    results = {}
    for amp in ("off", "bf16"):
        model.zero_grad()
        with autocast(torch.device("cpu"), amp):
            outputs = model(images)
        losses = criterion(to_float(outputs), targets)
        loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        loss.backward()
        results[amp] = (loss.detach(), outputs["pred_boxes"].detach().float(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    loss32, boxes32, grads32 = results["off"]
    loss16, boxes16, grads16 = results["bf16"]
    assert torch.isfinite(loss16) and loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    torch.testing.assert_close(boxes16, boxes32, atol=0.03, rtol=0)
    assert grads16.keys() == grads32.keys()
    for n in grads32:
        assert torch.isfinite(grads16[n]).all(), n
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([grads16[n].flatten() for n in grads32])
    assert torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.95


def test_synthetic_recipe_fills_only_flags_not_given():
    args = detr_main.parse_args(["--dataset_file", "synthetic", "--hidden_dim", "64"])
    applied = recipes.apply_dataset_recipe(args)
    assert args.hidden_dim == 64 and "hidden_dim" not in applied
    assert args.backbone == recipes.SYNTHETIC_RECIPE["backbone"] and applied["backbone"] == "resnet18"
    args = detr_main.parse_args([])
    assert recipes.apply_dataset_recipe(args) == {} and args.backbone == "resnet50"


def test_synthetic_recipe_applies_to_a_namespace_built_without_parse_args():
    # main.main(get_args_parser().parse_args([...])) is how the original's submitit script calls main
    args = detr_main.get_args_parser().parse_args(["--dataset_file", "synthetic", "--hidden_dim", "64",
                                                   "--lr", "1e-4"])
    applied = recipes.apply_dataset_recipe(args)
    assert args.backbone == "resnet18" and args.backbone_weights == "none"
    assert args.epochs == recipes.SYNTHETIC_RECIPE["epochs"]
    assert args.hidden_dim == 64 and "hidden_dim" not in applied
    # a value equal to the parser's default is indistinguishable from an absent flag: the recipe's wins
    assert args.lr == recipes.SYNTHETIC_RECIPE["lr"]
    assert recipes.apply_dataset_recipe(args) is applied  # idempotent


def test_build_optimizer_two_groups():
    args = tiny_args(lr=3e-4, lr_backbone=2e-5, weight_decay=0.05)
    model, _, _ = detr_main.build_model(args)
    optimizer = detr_main.build_optimizer(model, args)
    rest, backbone = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert rest["lr"] == 3e-4 and backbone["lr"] == 2e-5
    assert rest["weight_decay"] == backbone["weight_decay"] == 0.05
    assert all("backbone" not in names[id(p)] for p in rest["params"])
    assert {names[id(p)] for p in backbone["params"]} == {
        n for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad}
    assert len(rest["params"]) + len(backbone["params"]) == sum(p.requires_grad for p in model.parameters())
    # a frozen backbone: the group exists (optimizer states of the original load) and is empty
    args = tiny_args(lr_backbone=0.0)
    model, _, _ = detr_main.build_model(args)
    assert detr_main.build_optimizer(model, args).param_groups[1]["params"] == []


class _Quadratic(torch.nn.Module):
    """loss = 0.5 * scale * |w|^2: its gradient is scale * w."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((4,), 1.0))

    def forward(self, samples):
        return {"w": self.w}


class _QuadraticCriterion(torch.nn.Module):
    weight_dict = {"loss_ce": 1.0}

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, outputs, targets):
        return {"loss_ce": 0.5 * self.scale * (outputs["w"] ** 2).sum(), "class_error": torch.tensor(0.0)}


def _batches(n):
    return [(nested_tensor_from_tensor_list([torch.rand(3, 4, 4)]), ({"image_id": torch.tensor(i)},))
            for i in range(n)]


def test_gradient_clipping_clips():
    model = _Quadratic()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    # gradient 1000 * w (norm 2000); clipped to norm 0.1, one SGD step of lr 1 moves w by exactly 0.1
    train_one_epoch(model, _QuadraticCriterion(1000.0), _batches(1), optimizer, torch.device("cpu"), 0, max_norm=0.1)
    assert torch.linalg.vector_norm(model.w.detach() - 1.0).item() == pytest.approx(0.1, rel=1e-5)
    model = _Quadratic()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_one_epoch(model, _QuadraticCriterion(1000.0), _batches(1), optimizer, torch.device("cpu"), 0, max_norm=0)
    assert torch.linalg.vector_norm(model.w.detach() - 1.0).item() == pytest.approx(2000.0, rel=1e-5)


def _record_lrs(optimizer) -> list:
    """The learning rate of each optimizer.step() call, appended to the returned list as the steps happen."""
    used = []
    step = optimizer.step

    def recording_step(*a, **k):
        used.append(optimizer.param_groups[0]["lr"])
        return step(*a, **k)

    optimizer.step = recording_step
    return used


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_warmup_scales_what_the_scheduler_set_even_after_a_drop():
    model = _Quadratic()
    optimizer = torch.optim.SGD([{"params": [model.w]}], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    scheduler.step()
    scheduler.step()  # the drop already happened: lr 0.01, initial_lr still 0.1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    used = _record_lrs(optimizer)
    stats = train_one_epoch(model, _QuadraticCriterion(), _batches(6), optimizer, torch.device("cpu"), 0,
                            warmup_iters=4)
    assert used == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # the scheduler's own value is back
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # StepLR goes on from the scheduler's 0.01
    assert stats["lr"] == pytest.approx(sum(used) / len(used))  # the epoch mean of the lrs actually used


def test_warmup_without_a_scheduler():
    model = _Quadratic()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)  # no "initial_lr": no scheduler ever touched it
    train_one_epoch(model, _QuadraticCriterion(), _batches(3), optimizer, torch.device("cpu"), 1, warmup_iters=4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)


class _AuxCriterion(torch.nn.Module):
    """A loss per DETR term and an auxiliary layer's copy of each, as SetCriterion names them."""
    weight_dict = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_ce_0": 1.0, "loss_bbox_0": 5.0,
                   "loss_giou_0": 2.0}

    def forward(self, outputs, targets):
        w = (outputs["w"] ** 2).sum()
        return {**{k: w * (i + 1) for i, k in enumerate(self.weight_dict)}, "class_error": torch.tensor(25.0)}


class _Recorder:
    """What a SummaryWriter is given: {tag: [(step, value), ...]}."""

    def __init__(self):
        self.scalars: dict = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, float(value)))


def test_console_lines_show_the_main_losses_and_tensorboard_gets_every_value(caplog):
    model = _Quadratic()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = _Recorder()
    with caplog.at_level(logging.INFO):
        stats = train_one_epoch(model, _AuxCriterion(), _batches(5), optimizer, torch.device("cpu"), 2,
                                print_freq=2, tensorboard=writer)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Epoch: [2] [")]
    assert [line.split("]")[1] for line in lines] == [" [0/5", " [2/5", " [4/5"]
    for line in lines:
        names = [part.split(":")[0] for part in line.split("  ")[2:]]
        assert names == ["loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "lr", "time", "data"], line
    # the epoch's averages: the same fields on the console, every one in the log file only
    averaged = [r for r in caplog.records if r.getMessage().startswith("Averaged stats")]
    assert [getattr(r, "file_only", False) for r in averaged] == [False, True]
    assert "loss_ce_0" not in averaged[0].getMessage() and "loss_ce_0_unscaled: " in averaged[1].getMessage()
    # TensorBoard: every logged value at each console line, at the global iteration (epoch 2 of 5 iterations)
    assert set(writer.scalars) == {f"train/{k}" for k in stats if k != "skipped_steps"}
    assert {"train/loss_giou_0", "train/loss_bbox_unscaled", "train/lr"} <= set(writer.scalars)
    assert [step for step, _ in writer.scalars["train/loss"]] == [10, 12, 14]
    assert writer.scalars["train/lr"][0] == (10, pytest.approx(0.01))
    assert writer.scalars["train/class_error"][0] == (10, 25.0)


def test_eval_every_and_the_records_of_a_run(data_dir, tmp_path, capsys):
    """--eval_every 2 over 3 epochs evaluates after epochs 1 and 2 (the last); the run leaves its full arguments
    (args.json), its console (console.log, with the full arguments and averages the console leaves out), TensorBoard
    events, and checkpoints at the original's cadence (checkpoint.pth, checkpoint0001.pth before the lr drop)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from util.plot_utils import plot_logs
    from util.two_stage import logged_test_stats

    out = tmp_path / "out"
    argv = (["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--output_dir", str(out)]
            + with_flag(with_flag(TINY, "--epochs", 3), "--lr_drop", 2) + ["--eval_every", "2"])
    stats = run(argv)
    console = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "checkpoint.pth", "checkpoint0001.pth",
                                                     "console.log", "eval", "log.txt", "tensorboard"]
    logs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [log["epoch"] for log in logs] == [0, 1, 2]
    assert [any(k.startswith("test_") for k in log) for log in logs] == [False, True, True]
    assert logs[2]["test_coco_eval_bbox"] == stats["coco_eval_bbox"] == logged_test_stats(out / "log.txt")[
        "coco_eval_bbox"]
    assert console.count("bbox AP") == 2 and console.count("Test: Total time") == 2
    plot_logs(out, output=tmp_path / "plot.png")  # copes with the epoch without test values

    saved = json.loads((out / "args.json").read_text())
    assert saved["eval_every"] == 2 and saved["hidden_dim"] == 32 and saved["num_classes"] == 4
    assert saved["backbone"] == "resnet18"  # a recipe's value: the run's full arguments
    # the console: a short summary of the flags given; the log file: the full arguments too
    summary = next(line for line in console.splitlines() if line.startswith("args given: "))
    assert "--eval_every 2 --hidden_dim 32" in summary and "--backbone " not in summary and "args: {" not in console
    log_file = (out / "console.log").read_text()
    assert "args given: " in log_file and '"frozen_weights": null' in log_file
    assert "Averaged stats (all): " in log_file and "Averaged stats (all)" not in console
    assert "Epoch: [2] [1/2]" in log_file and "Training time" in log_file
    metric_lines = [line for line in console.splitlines() if re.match(r"(Epoch: \[\d+\]|Test:) \[", line)]
    assert len(metric_lines) == 3 * 2 + 2 * 1 and max(map(len, metric_lines)) < 300
    assert all("loss_giou: " in line and "_unscaled" not in line and "loss_ce_0" not in line
               for line in metric_lines)

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in tags}
    # 2 iterations per epoch, both logged (the first and the last of the epoch)
    for tag in ("train/loss", "train/loss_ce", "train/loss_bbox", "train/loss_giou", "train/loss_ce_0",
                "train/loss_bbox_unscaled", "train/lr", "train/class_error"):
        assert steps[tag] == [0, 1, 2, 3, 4, 5], tag
    assert steps["epoch/train_loss"] == [0, 1, 2]
    assert steps["epoch/test_coco_eval_bbox/AP"] == steps["epoch/test_loss"] == [1, 2]
    assert events.Scalars("epoch/test_coco_eval_bbox/AP")[-1].value == pytest.approx(stats["coco_eval_bbox"][0])


def test_tensorboard_off_or_not_installed_writes_no_events(tmp_path, monkeypatch, caplog):
    import sys

    from util.tensorboard import open_writer

    assert open_writer(tmp_path, "off") is None and open_writer(None, "on") is None
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it raises ImportError
    with caplog.at_level(logging.WARNING):
        assert open_writer(tmp_path, "on") is None
    assert len(caplog.records) == 1 and "TensorBoard events not written" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_eval_every_must_be_positive(tmp_path):
    with pytest.raises(SystemExit, match="--eval_every 0"):
        run(["--dataset_file", "synthetic", "--eval_every", "0", "--output_dir", str(tmp_path)])


class _NanCriterion(torch.nn.Module):
    weight_dict = {"loss_ce": 1.0}

    def forward(self, outputs, targets):
        return {"loss_ce": outputs["w"].sum() * float("nan"), "class_error": torch.tensor(0.0)}


def test_non_finite_losses_are_skipped_then_stop_the_run(caplog):
    batch = (nested_tensor_from_tensor_list([torch.rand(3, 8, 8)]), ({"image_id": torch.tensor(42)},))
    model = _Quadratic()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING):
        stats = train_one_epoch(model, _NanCriterion(), [batch] * 3, optimizer, torch.device("cpu"), 0)
    assert stats["skipped_steps"] == 3
    assert "Loss is nan at epoch 0 iteration 0, step skipped. Image ids: [42]" in caplog.text
    assert torch.equal(model.w.detach(), torch.ones(4))
    with pytest.raises(NonFiniteLossError, match="5 consecutive non-finite losses"):
        train_one_epoch(model, _NanCriterion(), [batch] * 6, optimizer, torch.device("cpu"), 0)


def test_plots_from_the_real_run(trained, tmp_path):
    from util.plot_utils import plot_logs, plot_precision_recall

    out, _, _ = trained
    _, _, png = plot_logs(out, output=tmp_path / "logs.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, _, png = plot_precision_recall([out / "eval" / "latest.pth"], output=tmp_path / "pr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_falls_back_to_eager_when_it_cannot_compile(monkeypatch, caplog):
    from util.compile import CompiledOrEager

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler found")

    model = _Quadratic()
    wrapped = CompiledOrEager(model)
    monkeypatch.setattr(wrapped, "compiled", broken)
    with caplog.at_level(logging.WARNING):
        out = wrapped(None)
        out = wrapped(None)
    assert torch.equal(out["w"], model.w) and wrapped.failed
    assert caplog.text.count("torch.compile failed (RuntimeError: no C++ compiler found)") == 1
    assert list(wrapped.module.state_dict()) == ["w"]


def test_a_tiny_model_overfits_four_images(tmp_path):
    """Training works end to end: the loss falls steadily. (With the fused attention kernel in training, this
    very setup diverged within 10 steps: its backward loses precision once attention logits grow.)"""
    from datasets import build_dataset
    from util.nested_tensor import collate_fn

    root = generate(tmp_path / "data", seed=0, num_train=1, num_val=4, image_size=64)
    torch.manual_seed(0)
    args = tiny_args(hidden_dim=64, num_queries=30, dataset_file="coco", coco_path=str(root), val_size=64)
    model, criterion, _ = detr_main.build_model(args)
    samples, targets = collate_fn([item for item in build_dataset("val", args)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    model.train()
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and steadier on a busy machine
    try:
        _overfit(model, criterion, optimizer, samples, targets, losses)
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.6 * losses[0], losses[::10]


def _overfit(model, criterion, optimizer, samples, targets, losses):
    for _ in range(50):
        loss_dict = criterion(model(samples), targets)
        loss = sum(v * criterion.weight_dict[k] for k, v in loss_dict.items() if k in criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        assert torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1) < 1e4
        optimizer.step()
        losses.append(loss.item())


# gradient accumulation (--accum_steps)

def _detection_batch(counts, size=48, seed=0):
    """(image, target) pairs of equal size (so batches of any split pad alike), with counts[i] objects each."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i, k in enumerate(counts):
        boxes = torch.cat([torch.rand(k, 2, generator=gen) * 0.4 + 0.3, torch.rand(k, 2, generator=gen) * 0.3 + 0.1],
                          dim=1)
        items.append((torch.randn(3, size, size, generator=gen),
                      {"labels": torch.randint(0, 4, (k,), generator=gen), "boxes": boxes,
                       "image_id": torch.tensor(i)}))
    return items


def _one_step(batches, accum_steps, max_norm, ddp=False):
    """One SGD step of a tiny DETR (frozen BatchNorm, dropout 0, aux losses) from fixed initial weights; returns
    the gradients the optimizer saw, the weights after the step and, for each gradient all-reduce (bucket), how many
    forwards had run. ``ddp``: the model in DistributedDataParallel (within a process group, tests/test_dist.py)."""
    from util.nested_tensor import collate_fn

    torch.manual_seed(0)
    model, criterion, _ = detr_main.build_model(tiny_args())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    grads = {}
    optimizer.register_step_pre_hook(lambda *_: grads.update(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    trained, forwards, all_reduces = model, [], []
    if ddp:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counted_all_reduce(state, bucket):
            all_reduces.append(len(forwards))
            return allreduce_hook(state, bucket)
        model.register_forward_pre_hook(lambda *_: forwards.append(1))
        trained = torch.nn.parallel.DistributedDataParallel(model)
        trained.register_comm_hook(None, counted_all_reduce)
    train_one_epoch(trained, criterion, [collate_fn(b) for b in batches], optimizer, torch.device("cpu"), 0,
                    max_norm=max_norm, accum_steps=accum_steps)
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}, all_reduces


@pytest.mark.parametrize("max_norm", [0, 0.1])
def test_two_micro_batches_of_4_step_like_one_batch_of_8(max_norm):
    """Box counts differ between the halves (9 and 7; one image has more objects than queries), so both the box
    normaliser and the class loss's weighted-mean normaliser must be the whole batch's; clipping acts on the
    accumulated gradient."""
    items = _detection_batch([0, 1, 2, 6, 3, 1, 1, 2])
    big_grads, big_params, _ = _one_step([items], 1, max_norm)
    acc_grads, acc_params, _ = _one_step([items[:4], items[4:]], 2, max_norm)
    assert big_grads.keys() == acc_grads.keys() and len(big_grads) > 20
    for name, g in big_grads.items():  # within 1e-5 of the gradient's scale (float32 sums in another order)
        assert (acc_grads[name] - g).abs().max().item() <= 1e-5 * max(1.0, g.abs().max().item()), name
    for name, p in big_params.items():
        assert (acc_params[name] - p).abs().max().item() <= 1e-5 * max(1.0, p.abs().max().item()), name
    assert max(g.abs().max().item() for g in big_grads.values()) > 1e-2  # gradients that mean something


class _AccumulatingQuadraticCriterion(_QuadraticCriterion):
    """Each micro-batch's share of the whole batch's loss, as SetCriterion's batch_targets gives."""

    def __init__(self, scale: float = 1.0, nan_ids=()):
        super().__init__(scale)
        self.nan_ids = set(nan_ids)
        self.seen = []

    def forward(self, outputs, targets, batch_targets=None):
        ids = [int(t["image_id"]) for t in targets]
        self.seen.append(ids)
        losses = super().forward(outputs, targets)
        share = len(targets) / len(batch_targets if batch_targets is not None else targets)
        losses["loss_ce"] = losses["loss_ce"] * share * (float("nan") if self.nan_ids & set(ids) else 1.0)
        return losses


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_accumulation_warmup_and_epoch_count_optimizer_steps(caplog):
    model = _Quadratic()
    optimizer = torch.optim.SGD([{"params": [model.w]}], lr=0.1)
    used = _record_lrs(optimizer)
    criterion = _AccumulatingQuadraticCriterion()
    with caplog.at_level(logging.INFO):
        train_one_epoch(model, criterion, _batches(7), optimizer, torch.device("cpu"), 0, warmup_iters=5,
                        accum_steps=2)
    # 7 micro-batches: 3 steps of 2, the 7th left out (not even loaded); warmup over optimizer steps
    assert used == pytest.approx([0.02, 0.04, 0.06])
    assert criterion.seen == [[0], [1], [2], [3], [4], [5]]
    assert "the last 1 micro-batches of the epoch are left out" in caplog.text
    train_one_epoch(model, criterion, _batches(7), optimizer, torch.device("cpu"), 1, warmup_iters=5,
                    accum_steps=2)
    assert used[3:] == pytest.approx([0.08, 0.1, 0.1])  # epoch 1 goes on at optimizer step 3
    used.clear()
    train_one_epoch(model, criterion, _batches(2), optimizer, torch.device("cpu"), 0, accum_steps=3)
    assert used == pytest.approx([0.1])  # fewer micro-batches than accum_steps: one step of them all


def test_accumulated_step_with_clipping_and_fp16_scaler_is_the_whole_batchs():
    """K micro-batches of a quadratic loss: the step (clipped once, scaler once) equals one step on their sum."""
    results = []
    for accum_steps, scaler in ((1, None), (4, None), (4, torch.amp.GradScaler("cpu"))):
        model = _Quadratic()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        batches = _batches(4)
        if accum_steps == 1:  # the whole batch in one: the sum of the four losses
            batches = [(batches[0][0], tuple(t for _, ts in batches for t in ts))]
        updates = []
        if scaler is not None:
            real_update = scaler.update
            scaler.update = lambda *a: updates.append(1) or real_update(*a)
        stats = train_one_epoch(model, _AccumulatingQuadraticCriterion(1000.0), batches, optimizer,
                                torch.device("cpu"), 0, max_norm=0.1, accum_steps=accum_steps, scaler=scaler)
        results.append((model.w.detach().clone(), stats["loss"]))
        if scaler is not None:
            assert updates == [1]
    for w, loss in results[1:]:
        torch.testing.assert_close(w, results[0][0], rtol=1e-6, atol=1e-7)
        assert loss == pytest.approx(results[0][1], rel=1e-6)  # the logged loss is the whole batch's
    assert torch.linalg.vector_norm(results[0][0] - 1.0).item() == pytest.approx(0.1, rel=1e-5)


def test_non_finite_micro_batch_skips_its_whole_step(caplog):
    model = _Quadratic()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = _AccumulatingQuadraticCriterion(nan_ids={1})
    with caplog.at_level(logging.WARNING):
        stats = train_one_epoch(model, criterion, _batches(4), optimizer, torch.device("cpu"), 0, accum_steps=2)
    assert stats["skipped_steps"] == 1
    assert "Loss is nan at epoch 0 iteration 0 (micro-batch 1), step skipped. Image ids: [1]" in caplog.text
    # only the second step (micro-batches 2 and 3, each half the loss) moved w: by lr * w
    torch.testing.assert_close(model.w.detach(), torch.full((4,), 0.9))
    with pytest.raises(NonFiniteLossError, match="5 consecutive non-finite losses"):
        train_one_epoch(model, _AccumulatingQuadraticCriterion(nan_ids={0, 2, 4, 6, 8}), _batches(10), optimizer,
                        torch.device("cpu"), 0, accum_steps=2)


def test_accum_steps_through_main(data_dir, tmp_path, caplog):
    argv = ["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--output_dir", str(tmp_path)] + TINY
    with caplog.at_level(logging.INFO):
        stats = run(with_flag(with_flag(argv, "--batch_size", 2), "--accum_steps", 2))
    assert "effective batch size: 4 (2 per process x 1 processes x 2 accumulation steps)" in caplog.text
    log = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert math.isfinite(log["train_loss"]) and len(stats["coco_eval_bbox"]) == 12
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["args"]["accum_steps"] == 2
    with pytest.raises(SystemExit, match="--accum_steps must be at least 1"):
        run(with_flag(argv, "--accum_steps", 0))
