"""--two_stage: the original's two panoptic commands in one run. Stage 1 trains the box model into OUTPUT_DIR/box;
stage 2 trains the mask head on it, frozen (--masks --frozen_weights OUTPUT_DIR/box/checkpoint.pth), into
OUTPUT_DIR. Each stage is a call of ``main.main`` with that stage's arguments and the dataset's recipe for it.

Resumable: a stage whose folder holds a checkpoint.pth continues from it, and a stage whose checkpoint reached its
last epoch is not run again, so a requeued job (or the same command run again) goes on where it stopped.

``main.py`` passes in what this module may not import (util/ imports nothing from the training code): the stage
runner (``main.main``) and the recipe function (``datasets.recipes.apply_dataset_recipe``).
"""
import argparse
import copy
import json
import logging
from pathlib import Path
from typing import Any, Callable

from util.args import ONE_STAGE_FLAGS, given_flags, parser_defaults
from util.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)

RunStage = Callable[[argparse.Namespace], dict]
ApplyRecipe = Callable[[argparse.Namespace], Any]


def two_stages_apply(args: argparse.Namespace) -> bool:
    """Whether this run is --two_stage: asked for (or the dataset's default) and not a single stage's run
    (``util.args.ONE_STAGE_FLAGS``)."""
    return args.two_stage and not any(getattr(args, name) for name in ONE_STAGE_FLAGS)


def stage_args(args: argparse.Namespace, **overrides) -> argparse.Namespace:
    """The arguments of one stage of --two_stage: the flags the user set, ``overrides``, and the rest back to the
    parser's defaults so that ``main`` applies that stage's recipe (``datasets.recipes.MASK_STAGE_RECIPES`` for
    --masks)."""
    defaults = parser_defaults()
    stage = copy.deepcopy(args)
    for name in args.defaults_applied or {}:
        setattr(stage, name, copy.deepcopy(defaults[name]))
    for name, value in overrides.items():
        setattr(stage, name, value)
    stage.explicit_flags = sorted(given_flags(args) | set(overrides))
    stage.defaults_applied = None
    return stage


def train_two_stages(args: argparse.Namespace, run_stage: RunStage, apply_recipe: ApplyRecipe) -> dict:
    """The box model into OUTPUT_DIR/box, then the mask head on it, frozen, into OUTPUT_DIR, each stage by
    ``run_stage`` (``main.main``) unless it is finished. Returns stage two's stats."""
    output_dir = Path(args.output_dir)
    box_dir = output_dir / "box"
    logger.info("Two stages: 1. the box model into %s; 2. the mask head on it, frozen, into %s", box_dir, output_dir)
    box = stage_args(args, two_stage=False, output_dir=str(box_dir))
    if resume_stage(box, "Stage 1", apply_recipe):
        run_stage(box)
    logger.info("Stage 2: the mask head on the frozen box model %s", box_dir / "checkpoint.pth")
    masks = stage_args(args, two_stage=False, masks=True, frozen_weights=str(box_dir / "checkpoint.pth"))
    if resume_stage(masks, "Stage 2", apply_recipe):
        return run_stage(masks)
    return logged_test_stats(output_dir / "log.txt")


def resume_stage(stage: argparse.Namespace, name: str, apply_recipe: ApplyRecipe) -> bool:
    """Whether a stage of --two_stage still has to run. When its output folder holds a checkpoint.pth, the stage
    resumes from it (``stage.resume``); when that checkpoint reached the stage's last epoch, it is done (False).
    ``apply_recipe`` gives a copy of ``stage`` the epochs its recipe sets."""
    own = Path(stage.output_dir) / "checkpoint.pth"
    if not own.is_file():
        return True
    checkpoint = load_checkpoint(str(own))
    probe = copy.deepcopy(stage)
    apply_recipe(probe)
    # the epochs the resumed stage trains to (util.checkpoint.resume_schedule): the checkpoint's unless --epochs given
    epochs = probe.epochs
    if "epochs" not in given_flags(probe):
        epochs = (checkpoint.get("args") or {}).get("epochs", epochs)
    if checkpoint["epoch"] + 1 >= epochs:
        logger.info("%s: %s already reached its last epoch (%d): not run again", name, own, epochs - 1)
        return False
    logger.info("%s: resuming from %s (epoch %d of %d done)", name, own, checkpoint["epoch"] + 1, epochs)
    stage.resume = str(own)
    stage.explicit_flags = sorted(set(stage.explicit_flags) | {"resume"})
    return True


def logged_test_stats(log_path: Path) -> dict:
    """The evaluation stats of the last line of a run's log.txt that has them (what ``main`` returned when it
    trained: with --eval_every, epochs without evaluation log no test_* keys)."""
    lines = log_path.read_text().splitlines() if log_path.is_file() else []
    for line in reversed([line for line in lines if line.strip()]):
        stats = {k[len("test_"):]: v for k, v in json.loads(line).items() if k.startswith("test_")}
        if stats:
            return stats
    return {}
