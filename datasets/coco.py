"""COCO detection dataset: images + instance annotations of any COCO-format dataset.

The original's layout (``--coco_path``):

    <coco_path>/train2017/*.jpg    <coco_path>/annotations/instances_train2017.json
    <coco_path>/val2017/*.jpg      <coco_path>/annotations/instances_val2017.json

or any other, each path given on its own (``--train_json --train_images --val_json --val_images``, each
overriding the one derived from ``--coco_path``).

The annotation file is checked when the dataset is built (cheap, linear loops only) so that a bad
file fails early with a message naming the file and the offending item; so is the presence of every
image file it lists (all the missing ones in one error, before training or evaluation starts).
Whether an image file can be decoded is checked when it is loaded.
"""
import contextlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import PIL.Image
import torch
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from util.errors import UserError, UserFileNotFoundError, UserValueError

from . import transforms as T

logger = logging.getLogger(__name__)

# the flags naming each split's (image folder, annotation file), and their place in the original's layout
SPLIT_FLAGS = {"train": ("train_images", "train_json"), "val": ("val_images", "val_json")}
COCO_LAYOUT = {"train": ("train2017", "annotations/instances_train2017.json"),
               "val": ("val2017", "annotations/instances_val2017.json")}
# a class head this large (max category id + 1 rows) is most likely sparse, large ids
LARGE_CLASS_HEAD = 1000
# missing image files named one by one in the error (the count covers the rest)
MAX_LISTED_MISSING = 50


class DatasetError(UserError, ValueError):
    """A dataset file exists but its content is not what the loader expects."""


def load_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"malformed JSON in {path}: {e.msg} at line {e.lineno}, column {e.colno} "
                           f"(char {e.pos})") from e


# Annotation files read before their dataset is built (the number of classes, a comparison of the splits'
# categories), handed over to the dataset that reads the same file next (``load_annotations``), so that a large
# file (COCO train: 450 MB) is parsed once. Keyed by (real path, mtime, size): a changed file is read again.
_READ_AHEAD: dict[tuple, Any] = {}


def _file_key(path: Path) -> tuple:
    st = os.stat(path)
    return os.path.realpath(path), st.st_mtime_ns, st.st_size


def read_ahead(path: Path) -> Any:
    """The parsed content of the annotation file ``path``, kept for the next ``load_annotations`` of that file.
    Callers only read it (the dataset that takes it over owns it)."""
    key = _file_key(path)
    if key not in _READ_AHEAD:
        while len(_READ_AHEAD) >= 2:  # the train and val files; an entry no dataset took is not kept for long
            _READ_AHEAD.pop(next(iter(_READ_AHEAD)))
        _READ_AHEAD[key] = load_json(path)
    return _READ_AHEAD[key]


def load_annotations(path: Path) -> Any:
    """The parsed content of ``path``: the one ``read_ahead`` kept (handed over, not kept any longer), else read."""
    data = _READ_AHEAD.pop(_file_key(path), None)
    return load_json(path) if data is None else data


def check_coco_annotations(data: Any, ann_file: Path, num_classes: Optional[int] = None,
                           require_masks: bool = False) -> None:
    """Raise DatasetError if `data` is not a usable COCO instances dict (a 'bbox' [x, y, width, height] of finite
    numbers, width and height >= 0, on every annotation; a 'segmentation' too when `require_masks`). Boxes of zero
    width or height are named in a warning (training skips them, as the original does), and an annotation without
    'area' gets its box's width x height (the targets and COCO evaluation's area ranges read it), said in a log
    line."""
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"{ann_file}: expected a COCO dict with 'images' and 'annotations', found {found}")
    if not data["images"]:
        raise DatasetError(f"{ann_file}: empty split, 'images' has no entries")
    image_ids = set()
    for i, img in enumerate(data["images"]):
        missing = [k for k in ("id", "file_name") if not isinstance(img, dict) or k not in img]
        if missing:
            raise DatasetError(f"{ann_file}: entry {i} of 'images' has no '{missing[0]}' (found {img!r}); expected "
                               f"{{\"id\": ..., \"file_name\": ..., \"width\": ..., \"height\": ...}}")
        image_ids.add(img["id"])
    check_categories(data, ann_file)
    empty, without_area = [], []
    for ann in data["annotations"]:
        if ann["image_id"] not in image_ids:
            raise DatasetError(f"{ann_file}: annotation id {ann.get('id')} refers to image_id "
                               f"{ann['image_id']}, which is not in 'images'")
        if not _is_xywh(ann.get("bbox")):
            found = f"'bbox' {ann['bbox']!r}" if "bbox" in ann else "no 'bbox'"
            raise DatasetError(f"{ann_file}: annotation id {ann.get('id')} (image_id {ann['image_id']}) has {found}; "
                               f"expected [x, y, width, height], four numbers with width and height >= 0")
        if (ann["bbox"][2] == 0 or ann["bbox"][3] == 0) and not ann.get("iscrowd", 0):
            empty.append(ann)
        if "area" not in ann:
            without_area.append(ann)
        if require_masks and not ann.get("segmentation"):
            raise DatasetError(f"{ann_file}: annotation id {ann.get('id')} (image_id {ann['image_id']}) has no "
                               f"'segmentation', but masks were asked for (--masks): this dataset has boxes only")
    if empty:
        ann = empty[0]
        logger.warning("%d annotation%s of %s %s a box of zero width or height (first: annotation id %s (image_id %s, "
                       "bbox %s)); training skips them, as the original does", len(empty),
                       "" if len(empty) == 1 else "s", ann_file, "has" if len(empty) == 1 else "have", ann.get("id"),
                       ann["image_id"], ann["bbox"], extra={"once": True})
    for ann in without_area:
        ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    if without_area:
        logger.info("%d annotation%s of %s %s no 'area': using the box's width x height", len(without_area),
                    "" if len(without_area) == 1 else "s", ann_file, "has" if len(without_area) == 1 else "have",
                    extra={"once": True})
    if num_classes is not None and data["annotations"]:
        category_ids = np.fromiter((ann["category_id"] for ann in data["annotations"]), dtype=np.int64,
                                   count=len(data["annotations"]))
        bad = np.flatnonzero((category_ids >= num_classes) | (category_ids < 0))
        if len(bad):
            ann = data["annotations"][bad[0]]
            raise DatasetError(
                f"{ann_file}: annotation id {ann.get('id')} (image_id {ann['image_id']}) has category_id "
                f"{ann['category_id']}, outside [0, --num_classes={num_classes}); {len(bad)} annotation(s) "
                f"are out of range, the largest category_id is {category_ids.max()}: set --num_classes to at "
                f"least {category_ids.max() + 1}")


def _is_xywh(bbox: Any) -> bool:
    return (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
            and bbox[2] >= 0 and bbox[3] >= 0)


def check_categories(data: dict, ann_file: Path) -> None:
    """Every annotation's category_id must be the id of an entry of 'categories' (when the file has 'categories')."""
    if "categories" not in data or not data["annotations"]:
        return
    known = {c["id"] for c in data["categories"]}
    unknown = [ann for ann in data["annotations"] if ann["category_id"] not in known]
    if unknown:
        ann = unknown[0]
        ids = sorted({a["category_id"] for a in unknown})
        raise DatasetError(
            f"{ann_file}: annotation id {ann.get('id')} (image_id {ann['image_id']}) has category_id "
            f"{ann['category_id']}, which is not the id of any entry of 'categories' "
            f"(ids {_id_list(sorted(known))}); {len(unknown)} annotation(s) have a category not listed there, "
            f"with category_id {_id_list(ids)}: add those categories to 'categories' or fix the annotations")


def _id_list(ids: list, limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "") if ids else "none"


def check_image_files(data: dict, img_folder: Path, ann_file: Path, folder_flag: str) -> None:
    """Every image file that ``ann_file`` lists must exist under ``img_folder``: one error lists the missing ones
    (a path check per image, cheap even for COCO's 118k), rather than a crash mid-epoch at the first of them."""
    missing = [img for img in data["images"] if not os.path.exists(os.path.join(img_folder, img["file_name"]))]
    if not missing:
        return
    lines = [f"  {img_folder / img['file_name']} (image_id {img['id']})" for img in missing[:MAX_LISTED_MISSING]]
    if len(missing) > MAX_LISTED_MISSING:
        lines.append(f"  ... and {len(missing) - MAX_LISTED_MISSING} more")
    hint = (f": is {img_folder} ({folder_flag}) the folder holding this file's images? file_name is relative to it"
            if len(missing) == len(data["images"]) else "")
    raise UserFileNotFoundError("\n".join(
        [f"{len(missing)} of the {len(data['images'])} image files listed in {ann_file} are missing from "
         f"{img_folder} ({folder_flag}){hint}:"] + lines))


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools COCO index over an already loaded dict (without pycocotools' prints)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def convert_coco_poly_to_mask(segmentations: list, height: int, width: int) -> torch.Tensor:
    """COCO polygons / RLEs -> bool masks [N, height, width]."""
    masks = []
    for segmentation in segmentations:
        rles = coco_mask.frPyObjects(segmentation, height, width)
        mask = coco_mask.decode(rles)
        if mask.ndim < 3:  # a single RLE decodes to [H, W]
            mask = mask[..., None]
        masks.append(torch.from_numpy(mask.any(axis=2)))  # union of the polygon parts, bool
    if masks:
        return torch.stack(masks, dim=0)
    return torch.zeros((0, height, width), dtype=torch.bool)


def load_image(path: Path, image_id: int, ann_file: Path, mode: str = "RGB") -> PIL.Image.Image:
    """Open the image file `path` of `image_id` (listed in `ann_file`), converted to `mode`."""
    if not path.is_file():
        raise UserFileNotFoundError(f"image file {path} (image_id {image_id}, from {ann_file}) not found")
    try:
        with PIL.Image.open(path) as img:
            return img.convert(mode)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable or truncated files
        raise DatasetError(f"corrupted image file {path} (image_id {image_id}): {e}") from e


class ConvertCocoPolysToMask:
    """COCO annotations of one image -> the target dict used by the transforms and the model.

    As in the original: crowd annotations are dropped; boxes go xywh -> xyxy and are clipped to the
    image, then boxes with no width or height are dropped (with their label, mask, area, iscrowd).
    """

    def __init__(self, return_masks: bool = False):
        self.return_masks = return_masks

    def __call__(self, image: PIL.Image.Image, target: dict) -> tuple[PIL.Image.Image, dict]:
        w, h = image.size
        anno = [obj for obj in target["annotations"] if obj.get("iscrowd", 0) == 0]

        boxes = torch.as_tensor([obj["bbox"] for obj in anno], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # [N, 4] (x0, y0, x1, y1) absolute
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])

        out = {
            "boxes": boxes[keep],
            "labels": torch.tensor([obj["category_id"] for obj in anno], dtype=torch.int64)[keep],
        }
        if self.return_masks:
            out["masks"] = convert_coco_poly_to_mask([obj["segmentation"] for obj in anno], h, w)[keep]
        out["image_id"] = torch.tensor([target["image_id"]])
        out["area"] = torch.tensor([obj["area"] for obj in anno], dtype=torch.float32)[keep]
        out["iscrowd"] = torch.tensor([obj.get("iscrowd", 0) for obj in anno], dtype=torch.int64)[keep]
        out["orig_size"] = torch.as_tensor([int(h), int(w)])
        out["size"] = torch.as_tensor([int(h), int(w)])
        return image, out


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection dataset returning `(image, target)` after `transforms`.

    Same attributes as torchvision's CocoDetection (`root`, `coco`, `ids`); the annotation file is
    read once and validated (see `check_coco_annotations`).
    """

    def __init__(self, img_folder: Union[str, Path], ann_file: Union[str, Path],
                 transforms: Optional[Callable], return_masks: bool, num_classes: Optional[int] = None,
                 img_flag: Optional[str] = None, ann_flag: Optional[str] = None):
        """``img_flag``, ``ann_flag``: where the two paths came from, for the error messages (e.g. '--val_images')."""
        self.root = Path(img_folder)
        self.ann_file = Path(ann_file)
        img_flag = img_flag or "expected the COCO layout <coco_path>/{train2017,val2017}/"
        ann_flag = ann_flag or "expected the COCO layout <coco_path>/annotations/instances_{train,val}2017.json"
        if not self.root.is_dir():
            raise UserFileNotFoundError(f"image folder {self.root} not found ({img_flag})")
        if not self.ann_file.is_file():
            raise UserFileNotFoundError(f"annotation file {self.ann_file} not found ({ann_flag})")
        data = load_annotations(self.ann_file)
        check_coco_annotations(data, self.ann_file, num_classes, require_masks=return_masks)
        check_image_files(data, self.root, self.ann_file, img_flag)
        self.coco = coco_from_dict(data)
        # {id: name} of the model's categories when they are not just this file's (see ``build``); None: this file's
        self.category_names: Optional[dict[int, str]] = None
        self.ids = sorted(self.coco.imgs.keys())
        self._transforms = transforms
        self.prepare = ConvertCocoPolysToMask(return_masks)

    def __len__(self) -> int:
        return len(self.ids)

    def _load_image(self, image_id: int) -> PIL.Image.Image:
        return load_image(self.root / self.coco.imgs[image_id]["file_name"], image_id, self.ann_file)

    def __getitem__(self, idx: int):
        image_id = self.ids[idx]
        img = self._load_image(image_id)
        target = {"image_id": image_id, "annotations": self.coco.imgToAnns[image_id]}
        img, target = self.prepare(img, target)
        if self._transforms is not None:
            img, target = self._transforms(img, target)
        return img, target


def transforms_from_args(image_set: str, args) -> T.Compose:
    """make_coco_transforms with the image-size flags of `args`; absent or None flags take the
    original's values, so Namespaces from before these flags existed still work."""
    def arg(name, default):
        value = getattr(args, name, None)
        return default if value is None else value

    return T.make_coco_transforms(
        image_set,
        scales=arg("scales", None),
        max_size=arg("max_size", 1333),
        val_size=arg("val_size", 800),
        crop_scales=arg("crop_scales", (400, 500, 600)),
        crop_size=arg("crop_size", (384, 600)),
    )


def split_paths(image_set: str, args) -> tuple[Path, str, Path, str]:
    """(image folder, where it came from, annotation file, where it came from) of a split: ``--{split}_images`` and
    ``--{split}_json`` when given, else the original's layout under ``--coco_path``. "Where it came from" names the
    flag, for the error messages."""
    if image_set not in SPLIT_FLAGS:
        raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
    coco_path = getattr(args, "coco_path", None)
    paths, missing = [], []
    for flag, layout in zip(SPLIT_FLAGS[image_set], COCO_LAYOUT[image_set]):
        given = getattr(args, flag, None)
        if given:
            paths += [Path(given), f"--{flag}"]
        elif coco_path:
            root = Path(coco_path)
            if not root.is_dir():
                raise UserFileNotFoundError(f"COCO folder {root} (--coco_path) not found")
            paths += [root / layout, f"{layout} under --coco_path; --{flag} gives another path"]
        else:
            missing.append(f"--{flag}")
    if missing:
        dataset_file = getattr(args, "dataset_file", "coco")
        raise UserValueError(f"--dataset_file {dataset_file} needs --coco_path, the folder holding train2017/, "
                             f"val2017/ and annotations/, or the {image_set} split's own paths: "
                             f"{' and '.join(missing)} "
                             f"(--{image_set}_json: a COCO-format annotation file; --{image_set}_images: the folder "
                             f"its file_names are relative to)")
    img_folder, img_flag, ann_file, ann_flag = paths
    return img_folder, img_flag, ann_file, ann_flag


def _annotation_file(image_set: str, args) -> tuple[Path, str]:
    _, _, ann_file, ann_flag = split_paths(image_set, args)
    if not ann_file.is_file():
        raise UserFileNotFoundError(f"annotation file {ann_file} not found ({ann_flag})")
    return ann_file, ann_flag


def num_classes_from_annotations(args) -> Optional[tuple[int, str]]:
    """(max category id + 1, where it came from in words) for --num_classes when not given: from the training
    annotation file (COCO's gives 91, the original's value). With --eval, from the training file when one is given
    or present under --coco_path (the head the model trained with), else from the validation file. None when no
    annotation file is named (no --coco_path and no explicit paths).

    The ids are the class indices: sparse ids (3, 7, 12) leave unused rows, an id 0 is a class like any other (the
    no-object class is the head's last row). A head of more than ``LARGE_CLASS_HEAD`` rows is warned about."""
    split = "train"
    if getattr(args, "eval", False) and not getattr(args, "train_json", None):
        coco_path = getattr(args, "coco_path", None)
        if not (coco_path and (Path(coco_path) / COCO_LAYOUT["train"][1]).is_file()):
            split = "val"
    try:
        ann_file, _ = _annotation_file(split, args)
    except UserValueError:  # no path at all for it: nothing to read
        return None
    # the dataset of this file, built next, takes over what is read here (read_ahead), unless none will be built
    will_be_built = split == "val" or not getattr(args, "eval", False)
    data = read_ahead(ann_file) if will_be_built else load_json(ann_file)
    return num_classes_of_file(data, ann_file)


def num_classes_of_file(data: Any, ann_file: Path) -> tuple[int, str]:
    """(max category id + 1, where it came from in words) of an annotation file's parsed ``data``, which must list
    its 'categories'; a class head of more than ``LARGE_CLASS_HEAD`` rows is warned about."""
    categories = data.get("categories") if isinstance(data, dict) else None
    if not categories:
        raise DatasetError(f"{ann_file} lists no 'categories', so the number of classes is unknown: add them, or "
                           f"give --num_classes")
    max_id = max(c["id"] for c in categories)
    if max_id < 0:
        raise DatasetError(f"{ann_file}: category ids must be >= 0 (they index the class head), the largest is "
                           f"{max_id}")
    num_classes = max_id + 1
    if num_classes > LARGE_CLASS_HEAD:
        logger.warning("the class head would have %d rows (max category id %d + 1, from %s) for %d categories: "
                       "category ids are used as class indices, so every id up to the largest gets a row. Remap the "
                       "ids to 1..%d in your annotation files (or give --num_classes to silence this)",
                       num_classes + 1, max_id, ann_file, len(categories), len(categories))
    return num_classes, f"max category id {max_id} + 1, from {ann_file}"


def training_category_names(val_data: dict, val_file: Path, args) -> Optional[dict[int, str]]:
    """{id: name} of the categories the model is trained on (the training file's, plus any only the validation file
    has), for the checkpoint and the predictor; a validation category the training file lacks is warned about.
    None when there is no training file to compare with (e.g. --eval)."""
    if getattr(args, "eval", False):
        return None
    try:
        train_file, _ = _annotation_file("train", args)
    except (UserValueError, UserFileNotFoundError):  # the training dataset's build reports it
        return None
    train_data = read_ahead(train_file)  # the training dataset, built next, takes it over
    if not isinstance(train_data, dict) or not isinstance(val_data, dict):
        return None
    train_names = {c["id"]: c["name"] for c in train_data.get("categories") or []}
    val_names = {c["id"]: c["name"] for c in val_data.get("categories") or []}
    only_val = sorted(set(val_names) - set(train_names))
    if only_val:
        logger.warning("%d validation categor%s of %s %s not in the training file %s: %s. The model never learns "
                       "them (their AP is 0), and an id above the training file's largest has no class at all",
                       len(only_val), "y" if len(only_val) == 1 else "ies", val_file,
                       "is" if len(only_val) == 1 else "are", train_file,
                       ", ".join(f"{i} {val_names[i]!r}" for i in only_val[:20])
                       + (" ..." if len(only_val) > 20 else ""))
    names = {**val_names, **train_names}
    return {i: names[i] for i in sorted(names)}


def build(image_set: str, args) -> CocoDetection:
    """The ``image_set`` split ('train' or 'val') of a COCO-format dataset: see ``split_paths`` for its files."""
    img_folder, img_flag, ann_file, ann_flag = split_paths(image_set, args)
    category_names = None
    if image_set == "val" and ann_file.is_file():
        category_names = training_category_names(read_ahead(ann_file), ann_file, args)
    dataset = CocoDetection(img_folder, ann_file, transforms=transforms_from_args(image_set, args),
                            return_masks=getattr(args, "masks", False),
                            num_classes=getattr(args, "num_classes", None), img_flag=img_flag, ann_flag=ann_flag)
    if category_names is not None:
        dataset.category_names = category_names
    return dataset
