"""From a checkpoint to a model: the one way main.py (--resume, --frozen_weights, --finetune), hubconf.py, d2/ and
the tools load one.

    loaded = load_model("runs/synthetic/checkpoint.pth")  # or a URL, or a hub name: load_model("detr_resnet50")
    outputs = loaded.model(images)
    results = loaded.postprocessors["bbox"](outputs, image_sizes)

A checkpoint's model is rebuilt by ``models.detr.build`` from the parser's defaults plus the checkpoint's own args.
Which flags shape the model is ``ARCHITECTURE_FLAGS``: a checkpoint whose args lack one (the original's published
checkpoints predate this project's flags) gets the parser's default, which is the original's architecture, so its
weights load with strict keys. Loading always compares every key and shape (``util.checkpoint.load_model_state``);
when the weights do not fit, the error names the architecture flags that differ, then the keys.
"""
import argparse
import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from models.backbone import load_backbone_weights
from models.detr import build
from util import args as arguments
from util.args import KNOWN_NUM_CLASSES, KNOWN_THING_IDS, get_args_parser
from util.checkpoint import component_of, load_checkpoint, load_model_state
from util.dist import is_main_process
from util.errors import UserValueError

logger = logging.getLogger(__name__)

# Flags that shape the box model: --frozen_weights must come from a model built with the same ones; a --resume
# whose weights do not fit names those that differ (load_weights).
ARCHITECTURE_FLAGS = ("backbone", "dilation", "backbone_norm", "backbone_last_layer", "backbone_blocks",
                      "position_embedding", "hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward",
                      "pre_norm", "num_queries", "query_groups", "pos_at_input", "spatial_prior", "num_classes")
# What --resume also takes from the checkpoint for each flag not given: the size its run evaluated at
SIZE_FLAGS = ("val_size", "max_size")
# the original's other names for the same choice
FLAG_ALIASES = {"position_embedding": {"v2": "sine", "v3": "learned"}}

# The original's published models: torch.hub entrypoint -> (checkpoint URL, the flags it was trained with beyond the
# parser's defaults). hubconf.py's entrypoints build and load through this table.
PUBLISHED: dict[str, tuple[str, dict[str, Any]]] = {
    "detr_resnet50": ("https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
                      {"backbone": "resnet50"}),
    "detr_resnet50_dc5": ("https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-f0fb7ef5.pth",
                          {"backbone": "resnet50", "dilation": True}),
    "detr_resnet101": ("https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth",
                       {"backbone": "resnet101"}),
    "detr_resnet101_dc5": ("https://dl.fbaipublicfiles.com/detr/detr-r101-dc5-a2e86def.pth",
                           {"backbone": "resnet101", "dilation": True}),
    "detr_resnet50_panoptic": ("https://dl.fbaipublicfiles.com/detr/detr-r50-panoptic-00ce5173.pth",
                               {"backbone": "resnet50", "masks": True, "dataset_file": "coco_panoptic"}),
    "detr_resnet50_dc5_panoptic": ("https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-panoptic-da08f1b1.pth",
                                   {"backbone": "resnet50", "dilation": True, "masks": True,
                                    "dataset_file": "coco_panoptic"}),
    "detr_resnet101_panoptic": ("https://dl.fbaipublicfiles.com/detr/detr-r101-panoptic-40021d53.pth",
                                {"backbone": "resnet101", "masks": True, "dataset_file": "coco_panoptic"}),
}
PUBLISHED_URLS: dict[str, str] = {name: url for name, (url, _) in PUBLISHED.items()}

# What a loaded model is built with, whatever its checkpoint's args say: its weights are the checkpoint's (no
# backbone weights are read, no box model is frozen under the mask head), it is built on the CPU (then moved) and
# without the auxiliary outputs only training uses (the original's hub models return none)
INFERENCE_FLAGS: dict[str, Any] = {"device": "cpu", "backbone_weights": "none", "frozen_weights": None,
                                   "aux_loss": False}


# ----------------------------------------------------------------------------------------------
# The architecture a checkpoint was trained with


def checkpoint_flags(checkpoint: dict) -> dict:
    """The ``ARCHITECTURE_FLAGS`` and ``SIZE_FLAGS`` of the run that wrote ``checkpoint``. A flag its args lack (the
    original's checkpoints predate ours) has the parser's default, which is the original's architecture and
    evaluation size; num_classes, when they lack it, is read from the class head. A checkpoint without args (one
    written by hand or another tool) records no run: only its class head's num_classes."""
    ckpt_args = checkpoint.get("args") or {}
    defaults = arguments.parser_defaults() if ckpt_args else {}
    flags = {}
    for name in ARCHITECTURE_FLAGS + SIZE_FLAGS:
        if ckpt_args.get(name) is not None:
            flags[name] = ckpt_args[name]
        elif defaults.get(name) is not None:
            flags[name] = defaults[name]
    if "num_classes" not in flags:
        for key in ("class_embed.bias", "detr.class_embed.bias"):
            if key in checkpoint["model"]:
                flags["num_classes"] = int(checkpoint["model"][key].shape[0]) - 1
                break
    return flags


def take_checkpoint_flags(args, checkpoint: dict, *, flag: str = "--resume", source: Optional[str] = None,
                          skip: tuple[str, ...] = ()) -> dict:
    """--resume (and --finetune, ``flag``): every ``ARCHITECTURE_FLAGS`` and ``SIZE_FLAGS`` flag not given
    (``util.args.given_flags``) and not in ``skip`` takes the checkpoint's value, over a dataset recipe's; returned
    (what changed), and for --resume recorded in ``args.checkpoint_applied``. A given architecture flag that differs
    from the checkpoint's is an error naming both values, a given size a warning. Done before the model is built.
    ``source`` names the checkpoint in messages (default: ``args.resume``)."""
    source = source or args.resume
    given = arguments.given_flags(args)
    applied, conflicts = {}, []
    for name, theirs in checkpoint_flags(checkpoint).items():
        if name in skip:
            continue
        ours = getattr(args, name, None)
        aliases = FLAG_ALIASES.get(name, {})
        if name not in given:
            if ours != theirs:  # a recipe's value the checkpoint agrees with stays listed as the recipe's
                applied[name] = theirs
                (getattr(args, "defaults_applied", None) or {}).pop(name, None)
            setattr(args, name, copy.deepcopy(theirs))
        elif aliases.get(theirs, theirs) != aliases.get(ours, ours):
            if name in SIZE_FLAGS:
                logger.warning("--%s %s: the checkpoint's run evaluated at --%s %s (leave the flag out to use it)",
                               name, ours, name, theirs)
            else:
                conflicts.append(f"--{name}: checkpoint {theirs!r}, this run {ours!r}")
    if conflicts:
        raise UserValueError("\n".join([f"{flag} {source} was trained with other architecture flags than the "
                                     f"ones given here; leave them out (the checkpoint's apply) or give its values:"]
                                    + [f"  {c}" for c in conflicts]
                                    + (["  (to train on another number of classes from its weights, use --finetune)"]
                                       if any(c.startswith("--num_classes") for c in conflicts) else [])
                                    + (["  (another --num_queries needs new object queries, which the checkpoint does "
                                        "not have: fine-tune with its number, or train without --finetune)"]
                                       if flag == "--finetune" and any(c.startswith("--num_queries") for c in conflicts)
                                       else [])))
    if flag == "--resume":
        args.checkpoint_applied = applied
    return applied


def architecture_differences(ckpt_args: dict, args) -> list[str]:
    """``ARCHITECTURE_FLAGS`` whose checkpoint value differs from this run's, in words. A flag the checkpoint's args
    lack (the original's checkpoints predate ours) counts with the parser's default, which is the original's
    architecture; num_classes is compared only when the checkpoint records it. A checkpoint without args records
    no architecture: none."""
    if not ckpt_args:
        return []
    defaults = arguments.parser_defaults()
    differences = []
    for name in ARCHITECTURE_FLAGS:
        if ckpt_args.get(name) is not None:
            theirs = ckpt_args[name]
        elif name in defaults and defaults[name] is not None:
            theirs = defaults[name]
        else:
            continue
        ours = getattr(args, name, None)
        aliases = FLAG_ALIASES.get(name, {})
        if aliases.get(theirs, theirs) != aliases.get(ours, ours):
            differences.append(f"--{name}: checkpoint {theirs!r}, this run {ours!r}")
    return differences


# ----------------------------------------------------------------------------------------------
# Weights into a built model


def load_weights(model: nn.Module, checkpoint: dict, source: str, *, args: Optional[argparse.Namespace] = None,
                 flag: str = "checkpoint", require_same: bool = False, reinit_class_head: bool = False) -> list[str]:
    """Load ``checkpoint["model"]`` into ``model``, every key and shape matching (``util.checkpoint.load_model_state``;
    with ``reinit_class_head`` a class head of another size keeps its fresh initialisation, with a warning). Returns
    the keys not loaded.

    With ``args`` (the flags ``model`` was built with), a failure, or with ``require_same`` any architecture flag that
    differs, is an error that lists the ``ARCHITECTURE_FLAGS`` whose checkpoint value differs from ``args``' before
    the keys that do not fit; differences whose weights fit anyway are a warning. ``flag`` and ``source`` name the
    checkpoint in messages (``--resume runs/x/checkpoint.pth``)."""
    differences = architecture_differences(checkpoint.get("args") or {}, args) if args is not None else []
    problem, skipped = "", []
    try:
        skipped = load_model_state(model, checkpoint["model"], source=source, reinit_class_head=reinit_class_head)
    except ValueError as err:
        problem = str(err)
    if differences and (problem or require_same):
        header = (f"{flag} {source} was trained with another architecture than this run's; give this run the "
                  f"checkpoint's flags:")
        problem = "\n".join([header] + [f"  {d}" for d in differences] + ([problem] if problem else []))
    elif differences:
        logger.warning("%s %s: the checkpoint was trained with other architecture flags (its weights fit this "
                       "model): %s", flag, source, "; ".join(differences))
    if problem:
        raise UserValueError(problem)
    return skipped


def load_frozen_box_model(args, model_without_ddp) -> None:
    """--frozen_weights: a box model's checkpoint into ``model.detr`` (stage two of segmentation training). The
    checkpoint's architecture flags must be this run's; an error lists those that differ and the keys that do not
    fit."""
    checkpoint = load_checkpoint(args.frozen_weights)
    load_weights(model_without_ddp.detr, checkpoint, args.frozen_weights, args=args, flag="--frozen_weights",
                 require_same=True)
    logger.info("Loaded the frozen box model from %s", args.frozen_weights)


def load_initial_weights(args, model_without_ddp, finetune: Optional[dict] = None) -> None:
    """--frozen_weights (box model under a mask head), --finetune (weights only: ``load_finetune_weights``; its
    checkpoint as ``read_finetune_checkpoint`` gave it, else read now) or the backbone's own weights; with --resume
    none of them (the checkpoint's weights follow: ``load_weights``).

    Called before the DDP wrap. Backbone weights are read (or downloaded) by the main process only: DDP
    broadcasts its parameters and buffers to the other processes when it wraps the model, as in the original.
    """
    if args.frozen_weights:
        load_frozen_box_model(args, model_without_ddp)
    elif args.finetune:
        load_finetune_weights(model_without_ddp, finetune or read_finetune_checkpoint(args.finetune), args)
    elif not args.resume:
        if is_main_process():
            backbone = model_without_ddp.detr.backbone[0] if args.masks else model_without_ddp.backbone[0]
            source = load_backbone_weights(backbone, args.backbone_weights)
            logger.info("Backbone weights: %s%s", source or "random initialisation (--backbone_weights none)",
                        " (broadcast to the other processes)" if args.distributed else "")
        return
    logger.info("Backbone weights: from the checkpoint (--backbone_weights %s not used)", args.backbone_weights)


# ----------------------------------------------------------------------------------------------
# --finetune: a checkpoint's weights for another dataset


def read_finetune_checkpoint(source: str, known_categories: Optional[dict[str, dict[int, str]]] = None) -> dict:
    """The checkpoint --finetune ``source`` names: a path, a URL (through the torch hub cache) or a hub name (the
    published checkpoint, through the same cache), resolved as ``load_model`` resolves it. Its args are the run's
    that wrote it; for a published checkpoint the flags of ``PUBLISHED`` (a hub name: only those; a file or URL of
    one: under its own args) and, since the original's args record no categories, ``category_names`` from
    ``known_categories[its dataset_file]`` (COCO's: the caller, main.py, supplies them from datasets/, which models/
    does not import)."""
    published = published_name(source)
    published_args = {"dataset_file": "coco", **PUBLISHED[published][1]} if published else {}
    if source in PUBLISHED:
        checkpoint = load_checkpoint(PUBLISHED_URLS[source], local_path_ok=False)
        ckpt_args = published_args  # a hub name's flags are the table's, whatever its checkpoint's args say
    else:
        refuse_unknown_hub_name(source)
        checkpoint = load_checkpoint(source)
        ckpt_args = {**published_args, **(checkpoint.get("args") or {})}
    if published and ckpt_args.get("category_names") is None:
        ckpt_args["category_names"] = (known_categories or {}).get(ckpt_args["dataset_file"])
    checkpoint["args"] = ckpt_args
    return checkpoint


def take_finetune_flags(args, checkpoint: dict) -> dict:
    """--finetune: every architecture flag not given takes the checkpoint's value (``take_checkpoint_flags``), so
    ``--finetune detr_resnet50`` builds the published R50 without retyping its flags; not num_classes (this
    dataset's: the class head is the one part fine-tuning may re-initialise) nor the evaluation size (this
    dataset's images). A given architecture flag that differs is an error. Logged and returned."""
    applied = take_checkpoint_flags(args, checkpoint, flag="--finetune", source=args.finetune,
                                    skip=("num_classes",) + SIZE_FLAGS)
    if applied:
        logger.info("Fine-tuning from %s: its architecture for the flags you did not set: %s", args.finetune,
                    arguments.command_line_of(applied))
    return applied


# a model's parts, in the order a fine-tuning message lists them (``util.checkpoint.component_of``'s names)
PARTS = ("backbone", "positional encoding", "input projection", "transformer encoder", "transformer decoder",
         "object queries", "box head", "class head", "spatial prior (--spatial_prior)", "segmentation head")


def _category_names(names: Optional[dict]) -> Optional[dict[int, str]]:
    return None if names is None else {int(k): str(v) for k, v in names.items()}


def _describe_categories(names: Optional[dict[int, str]], limit: int = 5) -> str:
    if names is None:
        return "unnamed (the checkpoint records no categories)"
    shown = ", ".join(f"{i} {n}" for i, n in sorted(names.items())[:limit])
    return f"{len(names)} categories: {shown}{', ...' if len(names) > limit else ''}"


def load_finetune_weights(model: nn.Module, checkpoint: dict, args) -> list[str]:
    """--finetune: the checkpoint's weights into ``model``, all but the class head unless its classes are this
    dataset's: the same number (rows) and the same categories, ids and names (the checkpoint's args'
    ``category_names`` against ``args.category_names``, the dataset's). Otherwise the class head keeps its fresh
    initialisation: same-sized rows of other categories (a dataset with ids 1..K under COCO's person, bicycle, ...)
    would start the training from wrong classes. Any other part that does not fit is an error naming the
    architecture flags that differ. Says in one line what was loaded and what initialised; returns the keys
    initialised."""
    own = model.state_dict()
    state = dict(checkpoint["model"])
    head = [k for k in own if component_of(k) == "the class head"]
    theirs = _category_names((checkpoint.get("args") or {}).get("category_names"))
    ours = _category_names(getattr(args, "category_names", None))
    same_rows = all(k in state and tuple(state[k].shape) == tuple(own[k].shape) for k in head)
    keep_head = same_rows and theirs is not None and theirs == ours
    rows = next((int(state[k].shape[0]) for k in head if k in state), None)
    if not keep_head:
        for k in head:  # the model's fresh initialisation, loaded as if it were the checkpoint's
            state[k] = own[k]
    # num_classes is this dataset's: not an architecture difference to report
    ckpt_args = {k: v for k, v in (checkpoint.get("args") or {}).items() if k != "num_classes"}
    load_weights(model, {**checkpoint, "model": state, "args": ckpt_args}, args.finetune, args=args,
                 flag="--finetune")
    loaded = [k for k in own if keep_head or k not in head]
    parts = sorted(dict.fromkeys(component_of(k).removeprefix("the ") for k in loaded),
                   key=lambda part: PARTS.index(part) if part in PARTS else len(PARTS))
    if keep_head:
        parts[parts.index("class head")] = f"class head: the checkpoint's categories are this dataset's, " \
                                           f"{_describe_categories(ours)}"
        initialised = "nothing"
    else:
        why = ("the checkpoint records no categories" if theirs is None and same_rows else
               f"the checkpoint's {rows} rows are {_describe_categories(theirs)}; this dataset's are "
               f"{_describe_categories(ours)}")
        initialised = f"the class head ({args.num_classes + 1} rows: {args.num_classes} classes + no-object; {why})"
    logger.info("Fine-tuning from %s: loaded %d tensors (%s); initialised: %s", args.finetune, len(loaded),
                ", ".join(parts), initialised)
    return [] if keep_head else head


# ----------------------------------------------------------------------------------------------
# A checkpoint, a URL or a hub name -> a model ready for inference


@dataclass
class LoadedModel:
    """What ``load_model`` gives: a model with what it needs to read images and name its classes."""
    model: nn.Module                          # on the device asked for, in eval mode
    postprocessors: dict[str, nn.Module]      # 'bbox'; + 'segm' for mask models; + 'panoptic' when thing_ids is known
    args: dict[str, Any]                      # every flag it was built with: parser defaults < checkpoint < overrides
    category_names: Optional[dict[int, str]]  # {category id: name} from the checkpoint's args; None when it has none
    thing_ids: Optional[list[int]]            # a panoptic dataset's thing category ids (the rest are stuff), else None
    published: Optional[str]                  # the hub entrypoint whose published checkpoint this is, else None


def published_name(source: str) -> Optional[str]:
    """The hub entrypoint ``source`` is, or whose published checkpoint it is (by URL or file name), if any."""
    if source in PUBLISHED:
        return source
    for name, url in PUBLISHED_URLS.items():
        if source == url or Path(source).name == Path(url).name:
            return name
    return None


def refuse_unknown_hub_name(source: str) -> None:
    """A ``source`` that is no file, no URL and no ``PUBLISHED`` name but looks like a name: an error listing them."""
    if (source not in PUBLISHED and not source.startswith(("https://", "http://")) and not Path(source).exists()
            and "." not in source and "/" not in source):
        raise UserValueError(f"unknown hub model {source!r} (and no such checkpoint file); expected a checkpoint "
                             f"path, a URL or one of {', '.join(PUBLISHED)}")


def build_from_flags(flags: dict[str, Any]) -> tuple[argparse.Namespace, nn.Module, dict[str, nn.Module]]:
    """``models.detr.build`` on the parser's defaults updated with ``flags``: (args, model, postprocessors)."""
    args = get_args_parser().parse_args([])
    for name, value in flags.items():
        setattr(args, name, copy.deepcopy(value))
    model, _, postprocessors = build(args)
    return args, model, postprocessors


def load_model(source: str, *, device: Union[str, torch.device, None] = None, overrides: Optional[dict] = None,
               pretrained: bool = True) -> LoadedModel:
    """A model from ``source``, built as main.py builds it, with its weights, ready for inference.

    ``source``: a checkpoint file (this project's, or the original's, whose args are an ``argparse.Namespace``
    without this project's flags), a URL (through the torch hub cache, ``$TORCH_HOME/hub/checkpoints/``: a file
    already there is used offline), or a hub name (``PUBLISHED``: ``detr_resnet50``, ``detr_resnet50_panoptic``,
    ...: the original's published checkpoint, through the same cache).

    The model is built from the parser's defaults, updated with (in this order) the published model's flags (hub
    names, and files and URLs that are a published checkpoint), the checkpoint's args (not for hub names: their flags
    are the table's), its ``checkpoint_flags`` (num_classes from the class head when the args lack it, as the
    original's do; else from the dataset, 91 for coco and 250 for coco_panoptic), ``INFERENCE_FLAGS`` (CPU, no
    backbone weights read, nothing frozen, no auxiliary outputs), then ``overrides``. Its weights load with strict
    keys and shapes (an error names the architecture flags that differ and the keys that do not fit); with
    ``num_classes`` in ``overrides``, a class head of another size keeps its fresh initialisation, with a warning
    (fine-tuning). ``pretrained=False``: no weights are loaded (a hub name reads nothing; a file still gives its args).

    ``device``: where the model goes (None: CUDA when available, else the CPU). Returns a ``LoadedModel``; its
    ``args`` hold the evaluation size (``val_size``, ``max_size``) and ``panoptic_threshold``. ``thing_ids``: the
    checkpoint's args', else those of a dataset known without its files (coco_panoptic: ids up to 90).
    ``category_names``: the checkpoint's args' (``main.py`` records the dataset's); the published checkpoints carry
    none: their classes are COCO's (``published`` is set, ``args['dataset_file']`` says 'coco' or 'coco_panoptic'),
    whose names live in ``datasets/`` (which ``models/`` does not import), so an inference tool names them there.
    Raises ``FileNotFoundError`` / ``ValueError`` /
    ``RuntimeError`` (``util.errors`` types, with a message saying what to do) for a missing file, a name that is no
    hub model, weights that do not fit, or a URL neither cached nor downloadable.
    """
    overrides = dict(overrides or {})
    published = published_name(source)
    hub_flags = PUBLISHED[published][1] if published else {}
    if source in PUBLISHED:
        where = PUBLISHED_URLS[source]
        # torch.hub.load cannot take a local path instead: the offline message says only where the file goes
        checkpoint = load_checkpoint(where, local_path_ok=False) if pretrained else None
        ckpt_args, architecture = {}, {}  # a hub name's flags are the table's, whatever its checkpoint's args say
    else:
        refuse_unknown_hub_name(source)
        checkpoint = load_checkpoint(source)
        where, ckpt_args, architecture = source, dict(checkpoint.get("args") or {}), checkpoint_flags(checkpoint)
    flags = {**hub_flags, **ckpt_args, **architecture, **INFERENCE_FLAGS, **overrides}
    # the parser's default (coco) when nothing names the dataset: the published box models' table entries do not
    dataset_file = flags.get("dataset_file", arguments.parser_defaults()["dataset_file"])
    if flags.get("num_classes") is None:
        flags["num_classes"] = KNOWN_NUM_CLASSES.get(dataset_file)
        if flags["num_classes"] is None:
            raise UserValueError(f"checkpoint {where}: its args give no num_classes and its model has no class head "
                                 f"(class_embed.bias): is it a DETR checkpoint?")
    if flags.get("thing_ids") is None:
        flags["thing_ids"] = KNOWN_THING_IDS.get(dataset_file)
    args, model, postprocessors = build_from_flags(flags)
    if checkpoint is not None and pretrained:
        load_weights(model, checkpoint, where, args=None if source in PUBLISHED else args,
                     reinit_class_head="num_classes" in overrides)
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    args.device = str(device)
    names, thing_ids = getattr(args, "category_names", None), args.thing_ids
    return LoadedModel(model=model, postprocessors=postprocessors, args=vars(args),
                       category_names=_category_names(names),
                       thing_ids=None if thing_ids is None else sorted(int(i) for i in thing_ids),
                       published=published)
