r"""Convert a DETR checkpoint (this repository's or a published one) to the layout of the Detectron2 wrapper.

Run from the repository root (or from inside d2/ as ``python converter.py ...``, as the original's):

    # a published COCO detection model (through the torch hub cache, so a file already there is used offline)
    python -m d2.converter --source_model https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth \
        --output_model converted/detr_r50_d2.pth

    # a published panoptic model (250 class rows -> Detectron2's 133 COCO panoptic classes)
    python -m d2.converter --source_model https://dl.fbaipublicfiles.com/detr/detr-r50-panoptic-00ce5173.pth \
        --output_model converted/detr_r50_panoptic_d2.pth

    # a model trained with main.py on your own COCO-format data: its rows are your category ids
    python -m d2.converter --source_model runs/mine/checkpoint.pth --output_model converted/mine_d2.pth \
        --categories /path/to/annotations/instances_train2017.json

What changes (pure torch; Detectron2 is not needed to convert):
- every key gets the ``detr.`` prefix (the wrapper ``d2.detr.Detr`` holds the DETR module as ``.detr``);
- the torchvision ResNet becomes Detectron2's ResNet: ``backbone.0.body.conv1`` / ``bn1`` ->
  ``backbone.0.backbone.stem.conv1`` / ``stem.conv1.norm``, ``layerN.K.convM`` / ``bnM`` ->
  ``res{N+1}.K.convM`` / ``res{N+1}.K.convM.norm``, ``downsample.0`` / ``downsample.1`` -> ``shortcut`` /
  ``shortcut.norm``;
- the class head keeps only the rows of the dataset's categories, in the order Detectron2 numbers them
  (contiguous ids 0..K-1 by increasing dataset category id, as ``register_coco_instances`` and the builtin COCO
  panoptic metadata do), plus the last row (no object). DETR's rows are indexed by dataset category id
  (COCO: 91 ids + no-object = 92 rows, of which 80 are used; panoptic: 250 + 1 rows, of which 133 are used).
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

if not __package__:  # run as a file (cd d2 && python converter.py ..., as the original's): models/, util/, d2/ are here
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from d2.flags import NOT_BUILT  # noqa: E402
from datasets.coco import load_json  # noqa: E402
from datasets.coco_categories import COCO_CATEGORY_NAMES, COCO_PANOPTIC_CATEGORY_NAMES  # noqa: E402
from util.args import parser_defaults as main_py_parser_defaults  # noqa: E402
from util.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

logger = logging.getLogger(__name__)

# The 80 category ids of COCO detection (1..90 with 10 ids unused).
COCO_DETECTION_IDS = sorted(COCO_CATEGORY_NAMES)
# The 133 of COCO panoptic: the 80 things, then 53 stuff ids (92..200).
COCO_PANOPTIC_IDS = sorted(COCO_PANOPTIC_CATEGORY_NAMES)
# class-head rows (classes + no-object) of the published models -> their category ids
KNOWN_HEADS = {92: ("coco", COCO_DETECTION_IDS), 251: ("coco_panoptic", COCO_PANOPTIC_IDS)}

_TORCHVISION_BODY = "backbone.0.body."
_D2_BODY = "backbone.0.backbone."


class ConversionError(ValueError):
    """The checkpoint cannot be expressed in the Detectron2 wrapper's layout."""


def _resnet_key(rest: str, key: str) -> str:
    """torchvision ResNet key (below ``body.``) -> Detectron2 ResNet key (below ``backbone.``)."""
    parts = rest.split(".")
    if parts[0].startswith("layer"):  # layerN.K.<module>.<param>
        stage = f"res{int(parts[0][len('layer'):]) + 1}"
        block, module, tail = parts[1], parts[2], parts[3:]
        if module.startswith("conv"):
            new = [module]
        elif module.startswith("bn"):
            new = ["conv" + module[len("bn"):], "norm"]
        elif module == "downsample" and tail and tail[0] in ("0", "1"):
            new = ["shortcut"] if tail[0] == "0" else ["shortcut", "norm"]
            tail = tail[1:]
        else:
            raise ConversionError(f"backbone key {key!r}: unknown ResNet module {module!r}")
        return ".".join([stage, block, *new, *tail])
    module, tail = parts[0], parts[1:]
    if module == "conv1":
        return ".".join(["stem", "conv1", *tail])
    if module == "bn1":
        return ".".join(["stem", "conv1", "norm", *tail])
    raise ConversionError(f"backbone key {key!r}: unknown ResNet module {module!r} (expected a torchvision ResNet)")


def rename_key(key: str) -> str:
    """A DETR (or DETRsegm) state-dict key -> the key in Detectron2's ``Detr`` wrapper."""
    i = key.find(_TORCHVISION_BODY)
    if i >= 0:
        key = key[:i] + _D2_BODY + _resnet_key(key[i + len(_TORCHVISION_BODY):], key)
    return "detr." + key


def resolve_categories(spec: str, num_rows: int) -> Optional[list[int]]:
    """The dataset category ids the class head's rows stand for, sorted; None to keep the head unchanged.

    ``spec``: 'auto' (known heads of the published models: 92 rows -> COCO, 251 rows -> COCO panoptic),
    'coco', 'coco_panoptic', 'keep', a comma-separated list of ids, or a COCO-format JSON file (its 'categories').
    """
    if spec == "keep":
        return None
    if spec == "auto":
        if num_rows not in KNOWN_HEADS:
            raise ConversionError(
                f"the class head has {num_rows} rows ({num_rows - 1} classes + no-object), not one of the published "
                f"models' ({', '.join(f'{n} for {name}' for n, (name, _) in KNOWN_HEADS.items())}); say which "
                f"category ids its rows stand for: --categories path/to/instances.json (a COCO-format file), "
                f"--categories 1,2,3, or --categories keep when the rows already are Detectron2's contiguous ids")
        spec = KNOWN_HEADS[num_rows][0]
    if spec == "coco":
        ids = COCO_DETECTION_IDS
    elif spec == "coco_panoptic":
        ids = COCO_PANOPTIC_IDS
    elif Path(spec).suffix == ".json" or Path(spec).is_file():
        ids = _ids_from_json(Path(spec))
    else:
        try:
            ids = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ConversionError(f"--categories {spec!r}: expected auto, coco, coco_panoptic, keep, a "
                                  f"comma-separated list of category ids or a COCO-format JSON file") from None
    ids = sorted(ids)
    if not ids or len(set(ids)) != len(ids):
        raise ConversionError(f"--categories {spec!r}: expected distinct category ids, got {ids}")
    if ids[0] < 0 or ids[-1] >= num_rows - 1:
        raise ConversionError(
            f"--categories {spec!r}: category ids must lie in [0, {num_rows - 1}) for a class head of {num_rows} rows "
            f"({num_rows - 1} classes + no-object); got ids from {ids[0]} to {ids[-1]}")
    return ids


def _ids_from_json(path: Path) -> list[int]:
    if not path.is_file():
        raise FileNotFoundError(f"--categories: {path} not found")
    data = load_json(path)
    cats = data.get("categories") if isinstance(data, dict) else None
    if not cats or not all(isinstance(c, dict) and isinstance(c.get("id"), int) for c in cats):
        raise ConversionError(f"--categories {path}: expected a COCO-format file with a 'categories' list of "
                              f"{{'id': int, ...}}")
    return [c["id"] for c in cats]


def _class_head_rows(state: dict) -> int:
    keys = [k for k in state if k.split(".")[-2:] == ["class_embed", "weight"]]
    if len(keys) != 1:
        raise ConversionError(f"expected one class head (class_embed.weight) in the checkpoint, found {keys}")
    return int(state[keys[0]].shape[0])


def convert_state_dict(state: dict, categories: str = "auto") -> tuple[dict, Optional[list[int]]]:
    """Returns (the Detectron2 wrapper's state dict, the dataset category ids of its class rows or None)."""
    aids = [k for k in state if k.split(".")[-1] in ("reference_points", "prior_log_sigma")]
    if aids:
        raise ConversionError(f"the checkpoint uses the spatial prior (--spatial_prior: {aids}), a convergence aid "
                              f"of main.py that the Detectron2 wrapper does not build; it converts the published "
                              f"DETR architecture only")
    ids = resolve_categories(categories, _class_head_rows(state))
    out = {}
    for key, value in state.items():
        value = value.detach().clone() if torch.is_tensor(value) else value
        if ids is not None and key.split(".")[-2] == "class_embed":
            rows = torch.as_tensor(ids + [value.shape[0] - 1])  # the categories, then no-object (last row)
            value = value[rows].clone()
        out[rename_key(key)] = value
    return out, ids


def check_trained_flags(args: Optional[dict]) -> None:
    """Refuse a checkpoint whose ``args`` (main.py's flags it was trained with) give a flag of ``NOT_BUILT`` a value
    other than main.py's default: the wrapper builds the published DETR, not those variants. Flags the checkpoint
    does not record (the original's checkpoints have none of them) count as main.py's defaults."""
    if not args:
        return
    defaults = main_py_parser_defaults()
    used = {flag: args[flag] for flag in NOT_BUILT if flag in args and args[flag] != defaults[flag]}
    if used:
        raise ConversionError(
            "the checkpoint was trained with " + ", ".join(f"--{flag} {value}" for flag, value in used.items())
            + " (main.py's defaults: " + ", ".join(f"--{flag} {defaults[flag]}" for flag in used) + "), which the "
            "Detectron2 wrapper does not build; it converts the published DETR architecture only ("
            + "; ".join(f"--{flag}: {NOT_BUILT[flag]}" for flag in used) + ")")


def convert(source: str, output: str, categories: str = "auto") -> dict:
    """Read ``source`` (path or URL), write the converted checkpoint to ``output``; returns what was written."""
    checkpoint = load_checkpoint(source)
    check_trained_flags(checkpoint.get("args"))
    state, ids = convert_state_dict(checkpoint["model"], categories)
    converted = {"model": state,
                 "detr_conversion": {"source": source, "category_ids": ids}}
    save_checkpoint(converted, output)
    rows = next(v.shape[0] for k, v in state.items() if k.endswith("class_embed.weight"))
    segm = any(k.startswith("detr.detr.") for k in state)
    logger.info("%s -> %s: %d keys, %s model, class head %s (MODEL.DETR.NUM_CLASSES %d%s)", source, output, len(state),
                "segmentation" if segm else "box", "kept" if ids is None else f"remapped to {len(ids)} categories",
                rows - 1, ", MODEL.MASK_ON True" if segm else "")
    return converted


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "python -m d2.converter (or, inside d2/, python converter.py)",
        description="Convert a DETR checkpoint to the Detectron2 wrapper's layout.",
        epilog=__doc__[__doc__.index("Run from"):__doc__.index("What changes")],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source_model", required=True,
                        help="DETR checkpoint ({'model': state_dict, ...}): a path, or an http(s) URL read through "
                             "the torch hub cache ($TORCH_HOME/hub/checkpoints/)")
    parser.add_argument("--output_model", required=True, help="where to write the Detectron2 checkpoint (.pth)")
    parser.add_argument("--categories", default="auto",
                        help="dataset category ids of the class head's rows, mapped to Detectron2's contiguous ids "
                             "in increasing order: 'auto' (92 rows: COCO's 80 ids; 251 rows: COCO panoptic's 133), "
                             "'coco', 'coco_panoptic', a comma-separated list (1,2,3), a COCO-format JSON file "
                             "(its 'categories'), or 'keep' to leave the head as it is")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    from util.logger import setup_logging

    setup_logging()
    args = get_args_parser().parse_args(argv)
    try:
        convert(args.source_model, args.output_model, args.categories)
    except (ConversionError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"d2.converter: {err}") from err


if __name__ == "__main__":
    main(sys.argv[1:])
