"""End-to-end: tiny trainings through main.main on a small generated synthetic set."""
import json
import logging
import math

import pytest
import torch

import main as detr_main
from datasets.synthetic import SYNTHETIC_DEFAULTS, generate
from engine import NonFiniteLossError, train_one_epoch
from util.nested_tensor import nested_tensor_from_tensor_list

TINY = ["--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
        "--num_queries", "6", "--batch_size", "4", "--num_workers", "0", "--warmup_iters", "0", "--epochs", "1",
        "--lr_drop", "5"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate(root, seed=3, num_train=8, num_val=4, image_size=64)
    return root


def run(argv):
    return detr_main.main(detr_main.parse_args(argv))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = ["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--output_dir", str(out)] + TINY
    stats = run(argv)
    return out, argv, stats


def test_one_epoch_writes_checkpoint_log_and_eval(trained):
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
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_resume_continues_at_the_next_epoch_with_the_optimizer(trained, caplog):
    out, argv, _ = trained
    before = torch.load(out / "checkpoint.pth", weights_only=True)
    with caplog.at_level(logging.INFO, logger="detr"):
        run(argv[:-4] + ["--epochs", "2", "--lr_drop", "5", "--resume", str(out / "checkpoint.pth")])
    assert "restored model, optimizer, lr_scheduler, epoch (continuing at epoch 1)" in caplog.text
    assert "Epoch: [1]" in caplog.text and "Epoch: [0]" not in caplog.text
    logs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in logs] == [0, 1]
    after = torch.load(out / "checkpoint.pth", weights_only=True)
    assert after["epoch"] == 1
    # AdamW's step count went on from the restored state instead of restarting
    step_before = before["optimizer"]["state"][0]["step"]
    assert after["optimizer"]["state"][0]["step"] == 2 * step_before


def test_resume_can_override_the_lr_and_conflicting_starts_are_refused(trained, tmp_path, caplog):
    out, argv, _ = trained
    rerun = [a for a in argv]
    rerun[rerun.index("--output_dir") + 1] = str(tmp_path)
    rerun[rerun.index("--epochs") + 1] = "3"  # the checkpoint may be at epoch 1 already
    with caplog.at_level(logging.INFO, logger="detr"):
        run(rerun + ["--lr", "2e-4", "--resume", str(out / "checkpoint.pth")])
    assert "the command line overrides lr of the checkpoint" in caplog.text
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-4)
    with pytest.raises(SystemExit, match="--finetune .* cannot be combined with --resume"):
        run(rerun + ["--finetune", str(out / "checkpoint.pth"), "--resume", str(out / "checkpoint.pth")])


def test_eval_resume_reproduces_the_logged_ap(trained, tmp_path):
    out, argv, _ = trained
    logs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    eval_argv = [a for a in argv] + ["--eval", "--resume", str(out / "checkpoint.pth")]
    eval_argv[eval_argv.index("--output_dir") + 1] = str(tmp_path)
    stats = run(eval_argv)
    assert stats["coco_eval_bbox"] == pytest.approx(logs[-1]["test_coco_eval_bbox"], abs=1e-6)
    assert (tmp_path / "eval.pth").is_file()


def test_finetune_from_another_number_of_classes(trained, tmp_path, caplog):
    out, argv, _ = trained
    ft = [a for a in argv]
    ft[ft.index("--output_dir") + 1] = str(tmp_path)
    with caplog.at_level(logging.INFO):
        run(ft + ["--num_classes", "9", "--finetune", str(out / "checkpoint.pth")])
    assert "class head re-initialised" in caplog.text
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["model"]["class_embed.weight"].shape[0] == 10 and ckpt["epoch"] == 0


def test_dataset_smaller_than_a_batch(data_dir, tmp_path):
    argv = ["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--output_dir", str(tmp_path)] + TINY
    argv[argv.index("--batch_size") + 1] = "16"
    stats = run(argv)
    assert len(stats["coco_eval_bbox"]) == 12


def test_amp_is_refused_until_implemented(data_dir):
    with pytest.raises(SystemExit, match="--amp bf16: mixed precision is not available yet"):
        run(["--dataset_file", "synthetic", "--coco_path", str(data_dir), "--amp", "bf16"] + TINY)


def test_synthetic_defaults_fill_only_flags_not_given():
    args = detr_main.parse_args(["--dataset_file", "synthetic", "--hidden_dim", "64"])
    assert args.hidden_dim == 64 and "hidden_dim" not in args.defaults_applied
    assert args.backbone == SYNTHETIC_DEFAULTS["backbone"] and args.defaults_applied["backbone"]
    args = detr_main.parse_args([])
    assert args.backbone == "resnet50" and args.defaults_applied == {}


class _NanCriterion(torch.nn.Module):
    weight_dict = {"loss_ce": 1.0}

    def forward(self, outputs, targets):
        return {"loss_ce": outputs["x"].sum() * float("nan"), "class_error": torch.tensor(0.0)}


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, samples):
        return {"x": self.w * samples.tensors.mean()}


def test_non_finite_losses_are_skipped_then_stop_the_run(caplog):
    batch = (nested_tensor_from_tensor_list([torch.rand(3, 8, 8)]), ({"image_id": torch.tensor(42)},))
    model = _Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="detr"):
        stats = train_one_epoch(model, _NanCriterion(), [batch] * 3, optimizer, torch.device("cpu"), 0)
    assert stats["skipped_steps"] == 3
    assert "Loss is nan at epoch 0 iteration 0, step skipped. Image ids: [42]" in caplog.text
    assert torch.equal(model.w.detach(), torch.ones(1))
    with pytest.raises(NonFiniteLossError, match="5 consecutive non-finite losses"):
        train_one_epoch(model, _NanCriterion(), [batch] * 6, optimizer, torch.device("cpu"), 0)


def test_plots_from_the_real_run(trained, tmp_path):
    from util.plot_utils import plot_logs, plot_precision_recall

    out, _, _ = trained
    _, _, png = plot_logs(out, output=tmp_path / "logs.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, _, png = plot_precision_recall([out / "eval" / "latest.pth"], output=tmp_path / "pr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
