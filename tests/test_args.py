"""The command line (util/args.py): every flag of the original keeps its name, default and meaning (CONTRACT.md),
every flag has help, and --help groups the flags by topic with their defaults, for main.py and run_with_submitit.py."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_with_submitit
from util.args import command_line, command_line_of, get_args_parser, parse_args

REPO = Path(__file__).resolve().parents[1]

# CONTRACT.md's flags: the original's (flag -> (dest, default)) and the project's fixed new ones
CONTRACT_DEFAULTS = {
    "--lr": ("lr", 1e-4), "--lr_backbone": ("lr_backbone", 1e-5), "--batch_size": ("batch_size", 2),
    "--weight_decay": ("weight_decay", 1e-4), "--epochs": ("epochs", 300), "--lr_drop": ("lr_drop", 200),
    "--clip_max_norm": ("clip_max_norm", 0.1), "--frozen_weights": ("frozen_weights", None),
    "--backbone": ("backbone", "resnet50"), "--dilation": ("dilation", False),
    "--position_embedding": ("position_embedding", "sine"), "--enc_layers": ("enc_layers", 6),
    "--dec_layers": ("dec_layers", 6), "--dim_feedforward": ("dim_feedforward", 2048),
    "--hidden_dim": ("hidden_dim", 256), "--dropout": ("dropout", 0.1), "--nheads": ("nheads", 8),
    "--num_queries": ("num_queries", 100), "--pre_norm": ("pre_norm", False), "--masks": ("masks", False),
    "--no_aux_loss": ("aux_loss", True), "--set_cost_class": ("set_cost_class", 1),
    "--set_cost_bbox": ("set_cost_bbox", 5), "--set_cost_giou": ("set_cost_giou", 2),
    "--mask_loss_coef": ("mask_loss_coef", 1), "--dice_loss_coef": ("dice_loss_coef", 1),
    "--bbox_loss_coef": ("bbox_loss_coef", 5), "--giou_loss_coef": ("giou_loss_coef", 2),
    "--eos_coef": ("eos_coef", 0.1), "--dataset_file": ("dataset_file", "coco"), "--coco_path": ("coco_path", None),
    "--coco_panoptic_path": ("coco_panoptic_path", None), "--remove_difficult": ("remove_difficult", False),
    "--output_dir": ("output_dir", ""), "--seed": ("seed", 42), "--resume": ("resume", ""),
    "--start_epoch": ("start_epoch", 0), "--eval": ("eval", False), "--num_workers": ("num_workers", 2),
    "--world_size": ("world_size", 1), "--dist_url": ("dist_url", "env://"),
    "--device": ("device", "cuda" if torch.cuda.is_available() else "cpu"),
    "--backbone_weights": ("backbone_weights", "imagenet"), "--num_classes": ("num_classes", None),
    "--amp": ("amp", "off"),
}
# what giving each value flag means: the parsed value, of the original's type
CONTRACT_VALUES = {
    "--lr": ("2e-4", 2e-4), "--lr_backbone": ("0", 0.0), "--batch_size": ("4", 4), "--weight_decay": ("0", 0.0),
    "--epochs": ("3", 3), "--lr_drop": ("2", 2), "--clip_max_norm": ("0", 0.0), "--frozen_weights": ("a.pth", "a.pth"),
    "--backbone": ("resnet101", "resnet101"), "--position_embedding": ("learned", "learned"),
    "--enc_layers": ("1", 1), "--dec_layers": ("1", 1), "--dim_feedforward": ("64", 64), "--hidden_dim": ("64", 64),
    "--dropout": ("0", 0.0), "--nheads": ("4", 4), "--num_queries": ("10", 10), "--set_cost_class": ("2", 2.0),
    "--set_cost_bbox": ("1", 1.0), "--set_cost_giou": ("1", 1.0), "--mask_loss_coef": ("2", 2.0),
    "--dice_loss_coef": ("2", 2.0), "--bbox_loss_coef": ("1", 1.0), "--giou_loss_coef": ("1", 1.0),
    "--eos_coef": ("0.2", 0.2), "--dataset_file": ("coco_panoptic", "coco_panoptic"), "--coco_path": ("c", "c"),
    "--coco_panoptic_path": ("p", "p"), "--output_dir": ("o", "o"), "--seed": ("1", 1), "--resume": ("r", "r"),
    "--start_epoch": ("5", 5), "--num_workers": ("0", 0), "--world_size": ("2", 2), "--dist_url": ("tcp://x:1", "tcp://x:1"),
    "--device": ("cpu", "cpu"), "--backbone_weights": ("none", "none"), "--num_classes": ("5", 5),
    "--amp": ("bf16", "bf16"),
}
GROUPS = ("model", "loss", "data", "training", "evaluation", "distributed", "CPU convergence aids")


def _flags(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def test_the_contract_flags_keep_their_names_and_defaults():
    parser = get_args_parser()
    defaults = vars(parser.parse_args([]))
    by_flag = {s: a for a in _flags(parser) for s in a.option_strings}
    for flag, (dest, default) in CONTRACT_DEFAULTS.items():
        assert flag in by_flag, flag
        assert by_flag[flag].dest == dest, flag
        assert defaults[dest] == default and type(defaults[dest]) is type(default), flag


@pytest.mark.parametrize("flag", sorted(CONTRACT_VALUES))
def test_a_contract_flag_given_a_value_means_that_value(flag):
    text, value = CONTRACT_VALUES[flag]
    parsed = getattr(get_args_parser().parse_args([flag, text]), CONTRACT_DEFAULTS[flag][0])
    assert parsed == value and type(parsed) is type(value)


def test_the_contract_switches_flip_their_default():
    switches = [f for f, (_, d) in CONTRACT_DEFAULTS.items() if isinstance(d, bool)]
    assert set(switches) == {"--dilation", "--pre_norm", "--masks", "--no_aux_loss", "--remove_difficult", "--eval"}
    for flag in switches:
        dest, default = CONTRACT_DEFAULTS[flag]
        assert getattr(get_args_parser().parse_args([flag]), dest) is (not default)


def test_the_original_names_of_the_position_embedding_still_parse():
    for name in ("v2", "v3"):
        assert get_args_parser().parse_args(["--position_embedding", name]).position_embedding == name


@pytest.mark.parametrize("parser", [get_args_parser(), run_with_submitit.get_parser()], ids=["main", "submitit"])
def test_every_flag_has_help_and_belongs_to_a_topic(parser):
    assert [a.dest for a in _flags(parser) if not (a.help or "").strip()] == []
    groups = {g.title: g for g in parser._action_groups}
    main_flags = {a.dest for a in _flags(get_args_parser())}
    in_topics = {a.dest for title in GROUPS for a in groups[title]._group_actions}
    assert main_flags <= in_topics  # no main.py flag left in the catch-all "options" group
    # the 66 of the grouping, --train_json --train_images --val_json --val_images, --accum_steps, --tensorboard,
    # --eval_every
    assert len(main_flags) == 73


@pytest.mark.parametrize("command", [["main.py"], ["run_with_submitit.py"]])
def test_help_groups_the_flags_by_topic_with_their_defaults(command):
    result = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    positions = [text.index(f"\n{title}:\n") for title in GROUPS]
    assert positions == sorted(positions)  # in the order of a reader: what is built, trained, evaluated
    assert "--epochs EPOCHS" in text and "(default: 300)" in text and "(default: 1e-05)" in text
    assert "{coco,coco_panoptic,synthetic,synthetic_panoptic}" in text  # --dataset_file lists its choices
    switch = text[text.index("  --dilation"):text.index("  --position_embedding")]
    assert "default" not in switch  # a switch is off by default; saying so is noise
    if command == ["run_with_submitit.py"]:
        assert "\njob:\n" in text and "(default: 8)" in text  # --ngpus


def test_an_unknown_dataset_is_refused_with_the_choices():
    with pytest.raises(SystemExit):
        parse_args(["--dataset_file", "voc"])


def test_the_console_summary_of_the_flags_given_reads_as_a_command_line():
    args = parse_args(["--dataset_file", "synthetic", "--no_aux_loss", "--no-two_stage", "--scales", "128",
                                 "160", "--masks", "--lr", "2e-4", "--eval_every", "5", "--tensorboard", "off"])
    assert command_line(args, args.explicit_flags) == (
        "--no_aux_loss --dataset_file synthetic --eval_every 5 --lr 0.0002 --masks --scales 128 160 "
        "--tensorboard off --no-two_stage")


def test_flags_a_recipe_or_a_checkpoint_set_read_as_a_command_line():
    # one formatter for the console's "args given", "Dataset defaults", "From the checkpoint" and fine-tuning lines
    assert command_line_of({"dilation": False, "aux_loss": False, "masks": True, "two_stage": False,
                            "scales": [128], "crop_scales": [], "lr": 4e-4}) == (
        "without --dilation --no_aux_loss --masks --no-two_stage --scales 128 --crop_scales --lr 0.0004")
