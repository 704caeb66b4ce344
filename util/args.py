"""The command line of main.py (every flag of the original, same names and defaults, plus the new ones).

Kept apart from main.py so that hubconf.py builds hub models from the same defaults without importing the
training code (datasets, pycocotools). ``main.get_args_parser`` is this function.

Also here: how "the flags the user gave" is known (``parse_args`` records them; ``given_flags``), which a dataset's
recipe (``datasets/recipes.py``) and a resumed checkpoint leave alone, and the checks of flag combinations
(``check_args``).
"""
import argparse
import copy
import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)


# --dataset_file: the datasets ``datasets.build_dataset`` builds
DATASET_FILES = ("coco", "coco_panoptic", "synthetic", "synthetic_panoptic")
# What --two_stage may not be combined with (each of them means one stage); see util/two_stage.py
ONE_STAGE_FLAGS = ("masks", "frozen_weights", "resume", "finetune", "eval")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default after its help, except where there is nothing to show: a switch
    (``store_true``) is off by default, and an unset path (None, '') is explained by its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if switch or action.default is None or action.default == "":
            return action.help
        return super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    """main.py's flags, by topic (argument groups, which parsers built with ``parents=[get_args_parser()]`` keep)."""
    parser = argparse.ArgumentParser("Set transformer detector", add_help=False, formatter_class=HelpFormatter)

    model = parser.add_argument_group("model")
    model.add_argument("--frozen_weights", type=str, default=None,
                       help="path to a pretrained box model; if set, only the mask head is trained")
    # * Backbone
    model.add_argument("--backbone", default="resnet50", type=str, help="torchvision ResNet to use")
    model.add_argument("--dilation", action="store_true",
                       help="replace the stride of the last block by a dilation (DC5)")
    model.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned", "v2", "v3"),
                       help="type of positional embedding on top of the image features (v2, v3: the original's "
                            "other names for sine, learned)")
    model.add_argument("--backbone_weights", default="imagenet", type=str,
                       help="initial backbone weights: 'imagenet' (torchvision's ImageNet-1k V1, from the torch "
                            "hub cache or downloaded), 'none' (random) or a path to a ResNet state dict; not used "
                            "when a full checkpoint is loaded (--resume, --frozen_weights)")
    # * Transformer
    model.add_argument("--enc_layers", default=6, type=int, help="number of encoding layers in the transformer")
    model.add_argument("--dec_layers", default=6, type=int, help="number of decoding layers in the transformer")
    model.add_argument("--dim_feedforward", default=2048, type=int,
                       help="intermediate size of the feedforward layers in the transformer blocks")
    model.add_argument("--hidden_dim", default=256, type=int,
                       help="size of the embeddings (dimension of the transformer)")
    model.add_argument("--dropout", default=0.1, type=float, help="dropout applied in the transformer")
    model.add_argument("--nheads", default=8, type=int, help="number of attention heads in the transformer")
    model.add_argument("--num_queries", default=100, type=int, help="number of query slots")
    model.add_argument("--pre_norm", action="store_true", help="pre-norm transformer layers")
    model.add_argument("--num_classes", default=None, type=int,
                       help="number of object classes (max class id + 1); default from the dataset: 91 for coco, "
                            "250 for coco_panoptic, the categories of the annotation file otherwise")
    # * Segmentation
    model.add_argument("--masks", action="store_true", help="train the segmentation head")

    loss = parser.add_argument_group("loss")
    loss.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                      help="disable the auxiliary decoding losses (loss at each layer)")
    # * Matcher
    loss.add_argument("--set_cost_class", default=1, type=float, help="class coefficient in the matching cost")
    loss.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box coefficient in the matching cost")
    loss.add_argument("--set_cost_giou", default=2, type=float, help="giou box coefficient in the matching cost")
    # * Loss coefficients
    loss.add_argument("--mask_loss_coef", default=1, type=float, help="weight of the focal mask loss")
    loss.add_argument("--dice_loss_coef", default=1, type=float, help="weight of the dice mask loss")
    loss.add_argument("--bbox_loss_coef", default=5, type=float, help="weight of the L1 box loss")
    loss.add_argument("--giou_loss_coef", default=2, type=float, help="weight of the GIoU box loss")
    loss.add_argument("--eos_coef", default=0.1, type=float,
                      help="relative classification weight of the no-object class")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_file", default="coco", choices=DATASET_FILES,
                      help="the dataset; synthetic and synthetic_panoptic (the embedded CPU-sized data, generated "
                           "on first use) also set every flag not given to their recipe (datasets/recipes.py)")
    data.add_argument("--coco_path", type=str, help="COCO-format folder (train2017/, val2017/, annotations/)")
    data.add_argument("--coco_panoptic_path", type=str, help="COCO panoptic folder")
    data.add_argument("--remove_difficult", action="store_true", help="(unused; kept for compatibility)")
    # any COCO-format layout: each path overrides the one derived from --coco_path
    data.add_argument("--train_json", type=str, default=None,
                      help="training annotation file, COCO format, any path (--dataset_file coco); overrides "
                           "<coco_path>/annotations/instances_train2017.json")
    data.add_argument("--train_images", type=str, default=None,
                      help="folder of the training images, the JSON's file_names being relative to it "
                           "(--dataset_file coco); overrides <coco_path>/train2017")
    data.add_argument("--val_json", type=str, default=None,
                      help="validation annotation file, COCO format, any path (--dataset_file coco); overrides "
                           "<coco_path>/annotations/instances_val2017.json. With --eval, only --val_json and "
                           "--val_images are needed (e.g. --eval --resume CKPT --val_json X --val_images Y)")
    data.add_argument("--val_images", type=str, default=None,
                      help="folder of the validation images, the JSON's file_names being relative to it "
                           "(--dataset_file coco); overrides <coco_path>/val2017")
    data.add_argument("--scales", default=[480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800], type=int,
                      nargs="+", help="training shorter-side sizes, one picked at random per image")
    data.add_argument("--max_size", default=1333, type=int, help="longest side after resizing")
    data.add_argument("--val_size", default=800, type=int, help="evaluation shorter-side size")
    data.add_argument("--crop_scales", default=[400, 500, 600], type=int, nargs="*",
                      help="sizes of the resize before the random crop augmentation (empty: no crop branch)")
    data.add_argument("--crop_size", default=[384, 600], type=int, nargs=2,
                      help="min and max side of the random crop")
    data.add_argument("--aspect_ratio_grouping", action="store_true",
                      help="batch training images of similar aspect ratio together (less padding, less compute; "
                           "the original mixes them)")
    data.add_argument("--num_workers", default=2, type=int, help="data loading workers")

    training = parser.add_argument_group("training")
    training.add_argument("--accum_steps", default=1, type=int,
                          help="optimizer step every K batches, with their gradients accumulated: the step of one "
                               "K times larger batch (effective batch batch_size x processes x K; losses normalised "
                               "over the K batches; --warmup_iters counts optimizer steps; the batches left over at "
                               "an epoch's end are dropped). 1: none, as the original")
    training.add_argument("--lr", default=1e-4, type=float, help="learning rate of the transformer and heads")
    training.add_argument("--lr_backbone", default=1e-5, type=float,
                          help="learning rate of the backbone; 0 freezes it (and then no intermediate layer trains)")
    training.add_argument("--batch_size", default=2, type=int, help="images per process and step")
    training.add_argument("--weight_decay", default=1e-4, type=float, help="AdamW weight decay")
    training.add_argument("--epochs", default=300, type=int, help="number of training epochs")
    training.add_argument("--lr_drop", default=200, type=int, help="epoch at which the lr is divided by 10 (StepLR)")
    training.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm (0: none)")
    training.add_argument("--two_stage", action=argparse.BooleanOptionalAction, default=False,
                          help="train the box model into OUTPUT_DIR/box, then the mask head on it, frozen (--masks "
                               "--frozen_weights OUTPUT_DIR/box/checkpoint.pth), into OUTPUT_DIR: the original's two "
                               "commands in one, each stage with the dataset's recipe for it (on by default for "
                               "synthetic_panoptic; --no-two_stage trains the box model only)")
    training.add_argument("--output_dir", default="",
                          help="path where to save, empty for no saving: checkpoints, log.txt (one JSON line per "
                               "epoch), args.json (the full arguments), console.log and TensorBoard events "
                               "(tensorboard/)")
    training.add_argument("--tensorboard", default="on", choices=("on", "off"),
                          help="write TensorBoard events into OUTPUT_DIR/tensorboard (needs --output_dir): every "
                               "logged loss and the lr at each console line, the epoch's averages and AP / PQ at "
                               "each evaluation")
    training.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                          help="device to use for training / testing")
    training.add_argument("--seed", default=42, type=int,
                          help="random seed (each process adds its rank to it, as the original)")
    training.add_argument("--resume", default="",
                          help="resume from checkpoint (path or URL): model, optimizer, lr scheduler and epoch; the "
                               "checkpoint's architecture, evaluation size (--val_size, --max_size) and schedule "
                               "(--epochs, --lr, --lr_drop, ...) apply to every flag not given here. A flag counts "
                               "as given when it is on the command line, or, for a script calling main.main(args) "
                               "without args.explicit_flags, when its value differs from the parser's default")
    training.add_argument("--finetune", default="",
                          help="start from a checkpoint's model weights only: a path, a URL or a hub name "
                               "(detr_resnet50, ...: the published weights, from the torch hub cache). The "
                               "architecture flags not given are the checkpoint's; the class head is re-initialised "
                               "unless the checkpoint's categories (ids and names) are this dataset's; optimizer and "
                               "epoch start fresh")
    training.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    training.add_argument("--compile", action="store_true",
                          help="torch.compile the model (pays on long runs: about 1.15x faster training steps on a "
                               "CPU after one to three minutes of compilation; falls back to eager where it cannot "
                               "compile)")
    training.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"),
                          help="mixed precision: off (fp32, as the original), bf16 or fp16")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval", action="store_true", help="only evaluate")
    evaluation.add_argument("--eval_every", default=1, type=int, metavar="N",
                            help="while training, evaluate every N epochs (and always after the last one)")
    evaluation.add_argument("--coco_eval_backend", default="auto", choices=("auto", "pycocotools", "hotcoco"),
                            help="COCO evaluator: hotcoco (fast, the same numbers as pycocotools), pycocotools (the "
                                 "reference) or auto (hotcoco when installed, else pycocotools)")
    evaluation.add_argument("--panoptic_threshold", default=0.85, type=float,
                            help="panoptic post-processing: queries scoring at most this are left out of the "
                                 "panoptic segmentation (the default is the original's)")

    distributed = parser.add_argument_group("distributed")
    distributed.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    distributed.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    distributed.add_argument("--dist_backend", default="auto", choices=("auto", "nccl", "gloo"),
                             help="torch.distributed backend (auto: NCCL when training on CUDA, else gloo)")
    distributed.add_argument("--dist_timeout", default=30.0, type=float,
                             help="minutes after which a collective that some rank never joins fails (instead of "
                                  "hanging)")

    aids = parser.add_argument_group(
        "CPU convergence aids", "not in the original: they let a small model train from random weights in minutes "
                                "(the synthetic recipes use them); the defaults are the original's")
    aids.add_argument("--warmup_iters", default=0, type=int,
                      help="linear lr warmup over this many iterations (0: none, as the original)")
    aids.add_argument("--backbone_norm", default="frozen_bn", choices=("frozen_bn", "bn"),
                      help="backbone normalisation: frozen batch norm (original) or trainable BatchNorm "
                           "(convergence aid when training from random weights)")
    aids.add_argument("--backbone_last_layer", default="layer4", choices=("layer3", "layer4"),
                      help="last ResNet stage used: layer4 (stride 32, original) or layer3 (stride 16)")
    aids.add_argument("--backbone_blocks", default=0, type=int,
                      help="keep only the first N residual blocks of each ResNet stage (0: all, the original); "
                           "a shallower trunk, e.g. 1 makes resnet18 a 1-1-1-1 ResNet")
    aids.add_argument("--train_backbone_stem", action="store_true",
                      help="also train the stem and layer1 (frozen in the original)")
    aids.add_argument("--pos_at_input", action="store_true",
                      help="also add the positional encoding to the encoder input (convergence aid)")
    aids.add_argument("--query_groups", default=1, type=int,
                      help="train with this many groups of queries, each matched on its own (Group DETR; a "
                           "convergence aid, 1 = the original); inference uses the first group")
    aids.add_argument("--spatial_prior", action="store_true",
                      help="per-query reference points with a Gaussian cross-attention prior, SMCA-style "
                           "(convergence aid for training from scratch; not the published DETR)")
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
        parser = argparse.ArgumentParser("DETR training and evaluation script", parents=[get_args_parser()],
                                         formatter_class=HelpFormatter)
    args = parser.parse_args(argv)
    args.explicit_flags = explicit_flags(parser, argv)
    return args


def parser_defaults() -> dict:
    """{destination: default} of every flag of ``get_args_parser()`` (a new dict each call)."""
    return vars(get_args_parser().parse_args([]))


def command_line(args: argparse.Namespace, names: list[str]) -> str:
    """The flags ``names`` (destinations) of ``args`` as a command line would give them, e.g.
    ``--dataset_file synthetic --no_aux_loss --scales 128 160``; a switch (store_true/false) whose value is not the
    one the flag gives reads ``without --flag``, a flag set to None is left out."""
    actions = {a.dest: a for a in get_args_parser()._actions}
    words = []
    for name in names:
        value, action = getattr(args, name, None), actions.get(name)
        if action is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            words.append(action.option_strings[0 if value else 1])
        elif action.nargs == 0:  # store_true / store_false: the flag gives its const
            words.append(action.option_strings[0] if value == action.const else f"without {action.option_strings[0]}")
        elif isinstance(value, list):
            words.append(" ".join([action.option_strings[0]] + [str(v) for v in value]))
        elif value is not None:
            words.append(f"{action.option_strings[0]} {value}")
    return " ".join(words)


def command_line_of(values: dict) -> str:
    """``command_line`` of flag values given as {destination: value}, e.g. the flags a recipe or a checkpoint set."""
    return command_line(argparse.Namespace(**values), list(values))


def given_flags(args: argparse.Namespace) -> set[str]:
    """The flags the caller set, one rule for the command line and for scripts calling ``main.main(args)``:
    ``args.explicit_flags`` when there is one (``parse_args`` records it), else every flag whose value differs
    from the parser's default, leaving out those that still hold the value a dataset recipe filled in
    (``args.defaults_applied``). A script that sets a flag to its default value and wants it to count as set
    lists it in ``args.explicit_flags``."""
    given = getattr(args, "explicit_flags", None)
    if given is not None:
        return set(given)
    defaults = parser_defaults()
    filled = {k for k, v in (getattr(args, "defaults_applied", None) or {}).items() if getattr(args, k, v) == v}
    return {k for k, v in defaults.items() if getattr(args, k, v) != v and k not in filled}


def check_args(args: argparse.Namespace) -> None:
    """Stop with a message on flag combinations that cannot work, before anything is built."""
    if args.accum_steps < 1:
        raise SystemExit(f"--accum_steps must be at least 1 (got {args.accum_steps})")
    if args.frozen_weights is not None and not args.masks:
        raise SystemExit("--frozen_weights is only for training the segmentation head: add --masks")
    if args.finetune and (args.resume or args.frozen_weights):
        raise SystemExit("--finetune starts from a checkpoint's weights only; it cannot be combined with "
                         f"--{'resume' if args.resume else 'frozen_weights'} (use one of them)")
    if args.masks and (args.hidden_dim % 128 or args.nheads % 8):
        raise SystemExit(f"--masks: the mask head's GroupNorm(8) layers need --hidden_dim a multiple of 128 and "
                         f"--nheads a multiple of 8 (got --hidden_dim {args.hidden_dim} --nheads {args.nheads})")
    if getattr(args, "eval_every", 1) < 1:
        raise SystemExit(f"--eval_every {args.eval_every}: give a number of epochs, 1 or more")
    if args.two_stage:
        one_stage = [f"--{name}" for name in ONE_STAGE_FLAGS if getattr(args, name)]
        if one_stage and "two_stage" in given_flags(args):
            raise SystemExit(f"--two_stage trains both stages from scratch; it cannot be combined with "
                             f"{', '.join(one_stage)} (run that stage alone)")
        if not one_stage and not args.output_dir:
            raise SystemExit("--two_stage needs --output_dir: stage 2 reads the box model from OUTPUT_DIR/box")
