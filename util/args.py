"""The command line of main.py (every flag of the original, same names and defaults, plus the new ones).

Kept apart from main.py so that hubconf.py builds hub models from the same defaults without importing the
training code (datasets, pycocotools). ``main.get_args_parser`` is this function.

Also here: the CPU-sized training recipe that ``--dataset_file synthetic`` applies to the flags the user did not
give (``SYNTHETIC_RECIPE``), and how "the flags the user gave" is known (``parse_args`` records them).
"""
import argparse
import copy
import logging
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Set transformer detector", add_help=False)
    parser.add_argument("--lr", default=1e-4, type=float, help="learning rate of the transformer and heads")
    parser.add_argument("--lr_backbone", default=1e-5, type=float,
                        help="learning rate of the backbone; 0 freezes it (and then no intermediate layer trains)")
    parser.add_argument("--batch_size", default=2, type=int, help="images per process and step")
    parser.add_argument("--weight_decay", default=1e-4, type=float, help="AdamW weight decay")
    parser.add_argument("--epochs", default=300, type=int, help="number of training epochs")
    parser.add_argument("--lr_drop", default=200, type=int, help="epoch at which the lr is divided by 10 (StepLR)")
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm (0: none)")
    parser.add_argument("--warmup_iters", default=0, type=int,
                        help="linear lr warmup over this many iterations (0: none, as the original)")

    # Model parameters
    parser.add_argument("--frozen_weights", type=str, default=None,
                        help="path to a pretrained box model; if set, only the mask head is trained")
    # * Backbone
    parser.add_argument("--backbone", default="resnet50", type=str, help="torchvision ResNet to use")
    parser.add_argument("--dilation", action="store_true",
                        help="replace the stride of the last block by a dilation (DC5)")
    parser.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned", "v2", "v3"),
                        help="type of positional embedding on top of the image features")
    parser.add_argument("--backbone_weights", default="imagenet", type=str,
                        help="initial backbone weights: 'imagenet' (torchvision's ImageNet-1k V1, from the torch "
                             "hub cache or downloaded), 'none' (random) or a path to a ResNet state dict; not used "
                             "when a full checkpoint is loaded (--resume, --frozen_weights)")
    parser.add_argument("--backbone_norm", default="frozen_bn", choices=("frozen_bn", "bn"),
                        help="backbone normalisation: frozen batch norm (original) or trainable BatchNorm "
                             "(convergence aid when training from random weights)")
    parser.add_argument("--backbone_last_layer", default="layer4", choices=("layer3", "layer4"),
                        help="last ResNet stage used: layer4 (stride 32, original) or layer3 (stride 16)")
    parser.add_argument("--backbone_blocks", default=0, type=int,
                        help="keep only the first N residual blocks of each ResNet stage (0: all, the original); "
                             "a shallower trunk, e.g. 1 makes resnet18 a 1-1-1-1 ResNet")
    parser.add_argument("--train_backbone_stem", action="store_true",
                        help="also train the stem and layer1 (frozen in the original)")
    # * Transformer
    parser.add_argument("--enc_layers", default=6, type=int, help="number of encoding layers in the transformer")
    parser.add_argument("--dec_layers", default=6, type=int, help="number of decoding layers in the transformer")
    parser.add_argument("--dim_feedforward", default=2048, type=int,
                        help="intermediate size of the feedforward layers in the transformer blocks")
    parser.add_argument("--hidden_dim", default=256, type=int,
                        help="size of the embeddings (dimension of the transformer)")
    parser.add_argument("--dropout", default=0.1, type=float, help="dropout applied in the transformer")
    parser.add_argument("--nheads", default=8, type=int, help="number of attention heads in the transformer")
    parser.add_argument("--num_queries", default=100, type=int, help="number of query slots")
    parser.add_argument("--pre_norm", action="store_true", help="pre-norm transformer layers")
    parser.add_argument("--pos_at_input", action="store_true",
                        help="also add the positional encoding to the encoder input (convergence aid)")
    parser.add_argument("--query_groups", default=1, type=int,
                        help="train with this many groups of queries, each matched on its own (Group DETR; a "
                             "convergence aid, 1 = the original); inference uses the first group")
    parser.add_argument("--spatial_prior", action="store_true",
                        help="per-query reference points with a Gaussian cross-attention prior, SMCA-style "
                             "(convergence aid for training from scratch; not the published DETR)")
    # * Segmentation
    parser.add_argument("--masks", action="store_true", help="train the segmentation head")
    parser.add_argument("--two_stage", action=argparse.BooleanOptionalAction, default=False,
                        help="train the box model into OUTPUT_DIR/box, then the mask head on it, frozen (--masks "
                             "--frozen_weights OUTPUT_DIR/box/checkpoint.pth), into OUTPUT_DIR: the original's two "
                             "commands in one, each stage with the dataset's recipe for it (on by default for "
                             "synthetic_panoptic; --no-two_stage trains the box model only)")

    parser.add_argument("--panoptic_threshold", default=0.85, type=float,
                        help="panoptic post-processing: queries scoring at most this are left out of the panoptic "
                             "segmentation (0.85, the original's)")

    # Loss
    parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                        help="disable the auxiliary decoding losses (loss at each layer)")
    # * Matcher
    parser.add_argument("--set_cost_class", default=1, type=float, help="class coefficient in the matching cost")
    parser.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box coefficient in the matching cost")
    parser.add_argument("--set_cost_giou", default=2, type=float, help="giou box coefficient in the matching cost")
    # * Loss coefficients
    parser.add_argument("--mask_loss_coef", default=1, type=float, help="weight of the focal mask loss")
    parser.add_argument("--dice_loss_coef", default=1, type=float, help="weight of the dice mask loss")
    parser.add_argument("--bbox_loss_coef", default=5, type=float, help="weight of the L1 box loss")
    parser.add_argument("--giou_loss_coef", default=2, type=float, help="weight of the GIoU box loss")
    parser.add_argument("--eos_coef", default=0.1, type=float,
                        help="relative classification weight of the no-object class")

    # dataset parameters
    parser.add_argument("--dataset_file", default="coco",
                        help="coco, coco_panoptic, synthetic or synthetic_panoptic")
    parser.add_argument("--coco_path", type=str, help="COCO-format folder (train2017/, val2017/, annotations/)")
    parser.add_argument("--coco_panoptic_path", type=str, help="COCO panoptic folder")
    parser.add_argument("--remove_difficult", action="store_true", help="(unused; kept for compatibility)")
    parser.add_argument("--num_classes", default=None, type=int,
                        help="number of object classes (max class id + 1); default from the dataset: 91 for coco, "
                             "250 for coco_panoptic, the categories of the annotation file otherwise")
    parser.add_argument("--scales", default=[480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800], type=int,
                        nargs="+", help="training shorter-side sizes, one picked at random per image")
    parser.add_argument("--max_size", default=1333, type=int, help="longest side after resizing")
    parser.add_argument("--val_size", default=800, type=int, help="evaluation shorter-side size")
    parser.add_argument("--crop_scales", default=[400, 500, 600], type=int, nargs="*",
                        help="sizes of the resize before the random crop augmentation (empty: no crop branch)")
    parser.add_argument("--crop_size", default=[384, 600], type=int, nargs=2,
                        help="min and max side of the random crop")
    parser.add_argument("--aspect_ratio_grouping", action="store_true",
                        help="batch training images of similar aspect ratio together (less padding, less compute; "
                             "the original mixes them)")

    parser.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to use for training / testing")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="",
                        help="resume from checkpoint (path or URL): model, optimizer, lr scheduler and epoch; the "
                             "checkpoint's architecture, evaluation size (--val_size, --max_size) and schedule "
                             "(--epochs, --lr, --lr_drop, ...) apply to every flag not given here. A flag counts as "
                             "given when it is on the command line, or, for a script calling main.main(args) "
                             "without args.explicit_flags, when its value differs from the parser's default")
    parser.add_argument("--finetune", default="",
                        help="start from a checkpoint's model weights only (path or URL); a class head of another "
                             "size is re-initialised with a warning; optimizer and epoch start fresh")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--eval", action="store_true", help="only evaluate")
    parser.add_argument("--coco_eval_backend", default="auto", choices=("auto", "pycocotools", "hotcoco"),
                        help="COCO evaluator: hotcoco (fast, the same numbers as pycocotools), pycocotools (the "
                             "reference) or auto (hotcoco when installed, else pycocotools)")
    parser.add_argument("--num_workers", default=2, type=int, help="data loading workers")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (pays on long runs: about 1.15x faster training steps on a CPU "
                             "after one to three minutes of compilation; falls back to eager where it cannot compile)")
    parser.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"),
                        help="mixed precision: off (fp32, as the original), bf16 or fp16")

    # distributed training parameters
    parser.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    parser.add_argument("--dist_backend", default="auto", choices=("auto", "nccl", "gloo"),
                        help="torch.distributed backend: auto (NCCL when training on CUDA, else gloo), nccl or gloo")
    parser.add_argument("--dist_timeout", default=30.0, type=float,
                        help="minutes after which a collective that some rank never joins fails (instead of hanging)")
    return parser


# --num_classes when not given, for the datasets whose categories are known without reading their files: the
# original's values, max category id + 1 (COCO ids run to 90, panoptic ids to 200 and the original kept 250 for the
# panoptic head). datasets/ re-exports this table (``datasets.NUM_CLASSES``) and ``models.build_model`` reads it, so
# that a model builds from ``get_args_parser().parse_args([...])`` alone, as the original's did. Other datasets
# (synthetic, any COCO-format folder) take theirs from their annotation file: ``datasets.default_num_classes``.
KNOWN_NUM_CLASSES: dict[str, int] = {"coco": 91, "coco_panoptic": 250}
# the thing category ids of the same datasets where they have stuff too: COCO panoptic's things are COCO's detection
# categories (ids up to 90), the rest (92..200) stuff, as the original's panoptic post-processor had it (``i <= 90``).
# datasets/coco_categories.py splits its names table by this one.
KNOWN_THING_IDS: dict[str, list[int]] = {"coco_panoptic": list(range(KNOWN_NUM_CLASSES["coco"]))}


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


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The destinations of the flags actually given in ``argv`` (whatever their values)."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return sorted(vars(probe.parse_args(argv)))


def parse_args(argv: list[str], parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """Parse a command line and record which flags it gave in ``args.explicit_flags``.

    ``main.main`` relies on that record to apply a dataset's recipe to the other flags only, and to let only
    flags given on the command line override the schedule of a resumed checkpoint.
    """
    if parser is None:
        parser = argparse.ArgumentParser("DETR training and evaluation script", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    args.explicit_flags = explicit_flags(parser, argv)
    return args


def given_flags(args: argparse.Namespace) -> set[str]:
    """The flags the caller set, one rule for the command line and for scripts calling ``main.main(args)``:
    ``args.explicit_flags`` when there is one (``parse_args`` records it), else every flag whose value differs
    from the parser's default, leaving out those that still hold the value a dataset recipe filled in
    (``args.defaults_applied``). A script that sets a flag to its default value and wants it to count as set
    lists it in ``args.explicit_flags``."""
    given = getattr(args, "explicit_flags", None)
    if given is not None:
        return set(given)
    defaults = vars(get_args_parser().parse_args([]))
    filled = {k for k, v in (getattr(args, "defaults_applied", None) or {}).items() if getattr(args, k, v) == v}
    return {k for k, v in defaults.items() if getattr(args, k, v) != v and k not in filled}


def apply_dataset_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """Give every flag the user did not set the value of the dataset's recipe (``DATASET_RECIPES``, with ``--masks``
    updated by ``MASK_STAGE_RECIPES``); returns and records in ``args.defaults_applied`` what was applied. Idempotent.

    Which flags were set is ``given_flags(args)``: without ``args.explicit_flags``, those whose value differs
    from the parser's default, so ``main.main(get_args_parser().parse_args(['--dataset_file', 'synthetic']))``
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
