"""Dataset recipes: the flags a dataset's runs start from, applied to every flag the user did not set.

``--dataset_file synthetic`` trains a CPU-sized model with convergence aids (``SYNTHETIC_RECIPE``);
``--dataset_file synthetic_panoptic`` trains both panoptic stages the same way (``SYNTHETIC_PANOPTIC_RECIPE``, and
``SYNTHETIC_PANOPTIC_MASK_RECIPE`` on top of it for the mask stage). COCO has none: its runs are the original's.
Which flags the user set is ``util.args.given_flags``; ``main.main`` calls ``apply_dataset_recipe`` first thing.
"""
import argparse
import copy
from typing import Any

from util.args import given_flags

# Model/training flags for the embedded synthetic dataset on a CPU, applied to every flag the user did not set.
SYNTHETIC_RECIPE: dict[str, Any] = {
    # a small model that fits a 2-core CPU
    "backbone": "resnet18",
    "backbone_weights": "none",
    "hidden_dim": 128,
    "enc_layers": 2,
    "dec_layers": 6,
    "dim_feedforward": 512,
    "nheads": 8,
    "num_queries": 16,
    "dropout": 0.0,
    # convergence aids for training from random weights in minutes (not the published DETR recipe)
    "backbone_norm": "bn",
    "train_backbone_stem": True,
    "backbone_last_layer": "layer3",
    "backbone_blocks": 1,  # compute aid: one residual block per stage, 0.58x the FLOPs of an iteration
    "pos_at_input": True,
    "spatial_prior": True,
    "warmup_iters": 200,
    # schedule and data
    "batch_size": 8,
    "lr": 4e-4,
    "lr_backbone": 4e-4,
    "epochs": 11,
    "lr_drop": 9,
    "scales": [128],
    "max_size": 160,
    "val_size": 128,
    "crop_scales": [],
    "num_workers": 0,
}

# --dataset_file synthetic_panoptic: both stages of panoptic training on the synthetic data, CPU-sized (see the
# README). Stage 1, the box model: it predicts things (shapes) and stuff ('sky', 'ground'), whose boxes the panoptic
# annotations hold. The detection recipe's model and aids: the backbone ends at layer3 (stride 16: a stride-32 map
# of a 128 px image is 4x5, too coarse for the shapes); the mask head reads layer3, layer2, layer1 and needs
# hidden_dim a multiple of 128 and 8 heads (its GroupNorm(8) layers).
SYNTHETIC_PANOPTIC_RECIPE: dict[str, Any] = {
    "two_stage": True,
    **SYNTHETIC_RECIPE,
    # the detection recipe's 6 decoder layers and 1-block trunk came after this recipe was measured (PQ target met
    # with 2 decoder layers and the full ResNet-18 trunk)
    "dec_layers": 2,
    "backbone_blocks": 0,
    "epochs": 8,
    "lr_drop": 6,
}
# Stage 2 (--masks, on the frozen box model): what changes from stage 1
SYNTHETIC_PANOPTIC_MASK_RECIPE: dict[str, Any] = {
    "epochs": 6,
    "lr_drop": 5,
    "warmup_iters": 0,
}

# --dataset_file -> the recipe its runs start from; with --masks, MASK_STAGE_RECIPES on top of it
DATASET_RECIPES: dict[str, dict[str, Any]] = {"synthetic": SYNTHETIC_RECIPE,
                                              "synthetic_panoptic": SYNTHETIC_PANOPTIC_RECIPE}
MASK_STAGE_RECIPES: dict[str, dict[str, Any]] = {"synthetic_panoptic": SYNTHETIC_PANOPTIC_MASK_RECIPE}


def apply_dataset_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """Give every flag the user did not set the value of the dataset's recipe (``DATASET_RECIPES``, with ``--masks``
    updated by ``MASK_STAGE_RECIPES``); returns and records in ``args.defaults_applied`` what was applied. Idempotent.

    Which flags were set is ``util.args.given_flags(args)``: without ``args.explicit_flags``, those whose value
    differs from the parser's default, so ``main.main(get_args_parser().parse_args(['--dataset_file', 'synthetic']))``
    gets the same recipe as the command line.
    """
    if getattr(args, "defaults_applied", None) is not None:
        return args.defaults_applied
    recipe = dict(DATASET_RECIPES.get(args.dataset_file, {}))
    if getattr(args, "masks", False):
        recipe.update(MASK_STAGE_RECIPES.get(args.dataset_file, {}))
    given = given_flags(args)
    applied = {}
    for name, value in recipe.items():
        if name not in given:
            setattr(args, name, copy.deepcopy(value))
            applied[name] = value
    args.defaults_applied = applied
    return applied
