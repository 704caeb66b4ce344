"""Datasets: `build_dataset(image_set, args)` and what the rest of the code asks of a dataset
(its pycocotools index, its number of classes, its category names, which main.py records in the run's args with
`set_dataset_metadata`). The flags each dataset's runs start from are in `datasets/recipes.py`."""
from pathlib import Path

import torch.utils.data
from pycocotools.coco import COCO

from util.args import KNOWN_NUM_CLASSES
from util.errors import UserFileNotFoundError, UserValueError

from . import coco
from .coco_categories import COCO_CATEGORY_NAMES, COCO_PANOPTIC_CATEGORY_NAMES

# the class counts known without reading data (91 for coco, 250 for coco_panoptic, the original's): one table, shared
# with models.build_model, which cannot import datasets/
NUM_CLASSES = KNOWN_NUM_CLASSES
SUPPORTED = "coco, coco_panoptic, synthetic or synthetic_panoptic"
# the categories known without reading data: those of the original's published (COCO-trained) models, whose
# checkpoints do not record them (--finetune compares them with this dataset's)
KNOWN_CATEGORY_NAMES = {"coco": COCO_CATEGORY_NAMES, "coco_panoptic": COCO_PANOPTIC_CATEGORY_NAMES}


def build_dataset(image_set: str, args) -> torch.utils.data.Dataset:
    check_split_flags(args)
    if args.dataset_file == "coco":
        return coco.build(image_set, args)
    if args.dataset_file == "synthetic":
        from . import synthetic  # imported here so `python -m datasets.synthetic` runs it only once

        return synthetic.build(image_set, args)
    if args.dataset_file == "coco_panoptic":
        from . import coco_panoptic

        return coco_panoptic.build(image_set, args)
    if args.dataset_file == "synthetic_panoptic":
        from . import synthetic

        return synthetic.build_panoptic(image_set, args)
    raise UserValueError(f"dataset {args.dataset_file!r} not supported; expected {SUPPORTED}")


def check_split_flags(args) -> None:
    """--train_json --train_images --val_json --val_images are read by --dataset_file coco only: refused (rather than
    silently ignored) with any other dataset."""
    given = [f"--{name}" for names in coco.SPLIT_FLAGS.values() for name in names if getattr(args, name, None)]
    if given and args.dataset_file != "coco":
        raise UserValueError(f"{', '.join(given)}: explicit annotation and image paths are for --dataset_file coco "
                             f"(any COCO-format dataset), not {args.dataset_file}")


def prepare(args) -> None:
    """Make sure the dataset's files exist before any process reads them: generates the synthetic data once (main.py
    calls this on one process per node first, see ``util.dist.local_main_first``). Nothing to do for COCO."""
    if args.dataset_file in ("synthetic", "synthetic_panoptic"):
        from . import synthetic

        synthetic.dataset_root(args)


def _unwrap(dataset):
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def get_coco_api_from_dataset(dataset) -> COCO:
    """The pycocotools COCO index behind `dataset` (through any torch Subset).

    For a panoptic dataset it is the index of the detection annotations of the same images, against which
    box / mask AP are computed, as in the original."""
    dataset = _unwrap(dataset)
    if hasattr(dataset, "detection_api"):
        return dataset.detection_api()
    if not hasattr(dataset, "coco"):
        raise TypeError(f"{type(dataset).__name__} has no COCO index (.coco)")
    return dataset.coco


def default_num_classes(args) -> int:
    """Number of classes of the classification head (max category id + 1) when --num_classes is not given.

    coco (any COCO-format dataset): from its annotation file (``coco.num_classes_from_annotations``: COCO's gives
    91, as the original), else 91; coco_panoptic: 250, the original's. Where the number came from, in words, goes to
    ``args.num_classes_source`` (printed at start)."""
    check_split_flags(args)
    if args.dataset_file == "coco":
        found = coco.num_classes_from_annotations(args)
        if found is not None:
            num_classes, args.num_classes_source = found
            return num_classes
    if args.dataset_file in NUM_CLASSES:
        return NUM_CLASSES[args.dataset_file]
    if args.dataset_file in ("synthetic", "synthetic_panoptic"):
        from . import synthetic

        kind = "panoptic" if args.dataset_file == "synthetic_panoptic" else "instances"
        ann_file = synthetic.dataset_root(args) / "annotations" / f"{kind}_train2017.json"
        if not ann_file.is_file():
            raise UserFileNotFoundError(f"annotation file {ann_file} not found")
        num_classes, args.num_classes_source = coco.num_classes_of_file(coco.load_json(ann_file), ann_file)
        return num_classes
    raise UserValueError(f"dataset {args.dataset_file!r} not supported; expected {SUPPORTED}")


def get_category_names(dataset) -> dict[int, str]:
    """{category_id: name} of a dataset built by `build_dataset` (e.g. to label drawn predictions)."""
    unwrapped = _unwrap(dataset)
    if hasattr(unwrapped, "categories"):  # panoptic: things and stuff, from the panoptic JSON
        return {c["id"]: c["name"] for c in unwrapped.categories}
    if getattr(unwrapped, "category_names", None) is not None:  # a validation split: the training file's categories
        return dict(unwrapped.category_names)
    api = get_coco_api_from_dataset(dataset)
    return {c["id"]: c["name"] for c in api.loadCats(api.getCatIds())}


def get_is_thing_map(dataset) -> dict[int, bool]:
    """{category_id: is a thing} of a panoptic dataset built by `build_dataset`, from its categories' `isthing`
    (what `models.segmentation.PostProcessPanoptic` takes)."""
    unwrapped = _unwrap(dataset)
    if not hasattr(unwrapped, "is_thing_map"):
        raise TypeError(f"{type(unwrapped).__name__} is not a panoptic dataset: it has no thing/stuff categories "
                        f"(use --dataset_file coco_panoptic or synthetic_panoptic)")
    return dict(unwrapped.is_thing_map)


def set_dataset_metadata(args, dataset) -> None:
    """``args.category_names`` {id: name} and, for a panoptic dataset, ``args.thing_ids`` (sorted ids of the thing
    categories; None otherwise), from the dataset's own categories. Checkpoints carry them in their args, so the
    panoptic post-processor and inference need no dataset code."""
    args.category_names = get_category_names(dataset)
    try:
        is_thing_map = get_is_thing_map(dataset)
    except TypeError:  # not a panoptic dataset
        args.thing_ids = None
    else:
        args.thing_ids = sorted(k for k, is_thing in is_thing_map.items() if is_thing)


def get_panoptic_files(dataset) -> tuple[Path, Path]:
    """(panoptic JSON, folder of its PNGs) of a panoptic dataset: the ground truth of `PanopticEvaluator`."""
    unwrapped = _unwrap(dataset)
    if not hasattr(unwrapped, "ann_folder"):
        raise TypeError(f"{type(unwrapped).__name__} is not a panoptic dataset: it has no panoptic PNGs")
    return unwrapped.ann_file, unwrapped.ann_folder
