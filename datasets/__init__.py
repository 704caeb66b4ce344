"""Datasets: `build_dataset(image_set, args)` and what the rest of the code asks of a dataset
(its pycocotools index, its number of classes, its category names)."""
import torch.utils.data
from pycocotools.coco import COCO

from . import coco

# the original's class counts: max category id + 1 (COCO ids run to 90, panoptic ids to 200 and the
# original kept 250 for the panoptic head)
NUM_CLASSES = {"coco": 91, "coco_panoptic": 250}
SUPPORTED = "coco, coco_panoptic or synthetic"


def build_dataset(image_set: str, args) -> torch.utils.data.Dataset:
    if args.dataset_file == "coco":
        return coco.build(image_set, args)
    if args.dataset_file == "synthetic":
        from . import synthetic  # imported here so `python -m datasets.synthetic` runs it only once

        return synthetic.build(image_set, args)
    if args.dataset_file == "coco_panoptic":
        raise NotImplementedError("--dataset_file coco_panoptic is not available yet: "
                                  "it comes with the panoptic issue")
    raise ValueError(f"dataset {args.dataset_file!r} not supported; expected {SUPPORTED}")


def prepare(args) -> None:
    """Make sure the dataset's files exist before any process reads them: generates the synthetic data once (main.py
    calls this on one process per node first, see ``util.dist.local_main_first``). Nothing to do for COCO."""
    if args.dataset_file == "synthetic":
        from . import synthetic

        synthetic.dataset_root(args)


def _unwrap(dataset):
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def get_coco_api_from_dataset(dataset) -> COCO:
    """The pycocotools COCO index behind `dataset` (through any torch Subset)."""
    dataset = _unwrap(dataset)
    if not hasattr(dataset, "coco"):
        raise TypeError(f"{type(dataset).__name__} has no COCO index (.coco)")
    return dataset.coco


def default_num_classes(args) -> int:
    """Number of classes of the classification head (max category id + 1) when --num_classes is not given."""
    if args.dataset_file in NUM_CLASSES:
        return NUM_CLASSES[args.dataset_file]
    if args.dataset_file == "synthetic":
        from . import synthetic

        ann_file = synthetic.dataset_root(args) / "annotations" / "instances_train2017.json"
        if not ann_file.is_file():
            raise FileNotFoundError(f"annotation file {ann_file} not found")
        categories = coco.load_json(ann_file).get("categories") or []
        if not categories:
            raise coco.DatasetError(f"{ann_file} lists no categories, so the number of classes is unknown")
        return max(c["id"] for c in categories) + 1
    raise ValueError(f"dataset {args.dataset_file!r} not supported; expected {SUPPORTED}")


def get_category_names(dataset) -> dict[int, str]:
    """{category_id: name} of a dataset built by `build_dataset` (e.g. to label drawn predictions)."""
    api = get_coco_api_from_dataset(dataset)
    return {c["id"]: c["name"] for c in api.loadCats(api.getCatIds())}
