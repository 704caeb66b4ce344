"""COCO panoptic segmentation dataset, in the original DETR's layout.

    <coco_path>/{train,val}2017/*.jpg                                   images
    <coco_panoptic_path>/annotations/panoptic_{train,val}2017.json      segments_info per image + categories
    <coco_panoptic_path>/panoptic_{train,val}2017/*.png                 segment id = R + 256 G + 256^2 B

The PNG folders may also stay where COCO's archive unpacks them (and where `datasets.synthetic` writes
them), `<coco_panoptic_path>/annotations/panoptic_{train,val}2017/`.

Each sample's target holds one entry per segment (things and stuff, crowd segments included, as in the
original): `labels` (category ids), `boxes` (x0 y0 x1 y1 in pixels, `util.box_ops.masks_to_boxes` of the masks
decoded from the PNG, as the original: the last pixel's index, not the JSON `bbox`, which ends one pixel further),
`iscrowd`, `area`, and with `return_masks` the `masks` [N, H, W] bool. The
categories, and which of them are things (`is_thing_map`), come from the JSON.

Box/mask AP during panoptic evaluation is computed, as in the original, against the detection
annotations of the same images, `<coco_path>/annotations/instances_{train,val}2017.json`:
`detection_api()` (what `datasets.get_coco_api_from_dataset` returns for this dataset) loads them on
first use.
"""
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from pycocotools.coco import COCO

from util.box_ops import masks_to_boxes
from util.errors import UserFileNotFoundError, UserValueError
from util.panoptic import rgb2id

from .coco import (DatasetError, check_coco_annotations, coco_from_dict, load_image, load_json,
                   transforms_from_args)

logger = logging.getLogger(__name__)


def check_panoptic_annotations(data: Any, ann_file: Path, num_classes: Optional[int] = None) -> None:
    """Raise DatasetError if `data` is not a usable COCO panoptic dict: categories with 'isthing', one
    annotation (PNG file name + segments_info) per image, segments with distinct non-zero ids, known categories,
    a box, an area and iscrowd."""
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"{ann_file}: expected a COCO panoptic dict with 'images', 'annotations' and "
                           f"'categories', found {found}")
    if not data["images"]:
        raise DatasetError(f"{ann_file}: empty split, 'images' has no entries")
    categories = {}
    for category in data["categories"]:
        if "id" not in category or "isthing" not in category:
            raise DatasetError(f"{ann_file}: category {category} needs an 'id' and 'isthing' (1 thing, 0 stuff)")
        categories[category["id"]] = category
    if num_classes is not None and categories and max(categories) >= num_classes:
        raise DatasetError(f"{ann_file}: category id {max(categories)} is outside [0, --num_classes={num_classes}); "
                           f"set --num_classes to at least {max(categories) + 1}")

    image_ids = {img["id"] for img in data["images"]}
    annotated = set()
    for ann in data["annotations"]:
        image_id = ann.get("image_id")
        if image_id not in image_ids:
            raise DatasetError(f"{ann_file}: annotation {ann.get('file_name')!r} refers to image_id {image_id}, "
                               f"which is not in 'images'")
        if image_id in annotated:
            raise DatasetError(f"{ann_file}: image_id {image_id} has more than one annotation")
        annotated.add(image_id)
        if "file_name" not in ann or "segments_info" not in ann:
            raise DatasetError(f"{ann_file}: the annotation of image_id {image_id} needs 'file_name' (its PNG) "
                               f"and 'segments_info'")
        seen = set()
        for segment in ann["segments_info"]:
            problem = _segment_problem(segment, seen, categories)
            if problem:
                raise DatasetError(f"{ann_file}: image_id {image_id} ({ann['file_name']}), segment id "
                                   f"{segment.get('id')} {problem}")
            seen.add(segment["id"])
    missing = image_ids - annotated
    if missing:
        raise DatasetError(f"{ann_file}: {len(missing)} image(s) have no annotation, e.g. image_id {min(missing)}")


def _segment_problem(segment: dict, seen: set, categories: dict) -> str:
    """What is wrong with one entry of segments_info ('' if nothing)."""
    if segment.get("id") in (None, 0):
        return "is not a valid id: a segment needs a non-zero 'id' (0 marks unlabelled pixels)"
    if segment["id"] in seen:
        return "appears twice in segments_info"
    if segment.get("category_id") not in categories:
        return (f"has category_id {segment.get('category_id')}, which is not in 'categories' "
                f"(ids {sorted(categories)})")
    bbox = segment.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"needs a 'bbox' [x, y, width, height], found {bbox!r}"
    for field in ("area", "iscrowd"):
        if field not in segment:
            return f"has no {field!r}"
    return ""


class CocoPanoptic(torch.utils.data.Dataset):
    """COCO panoptic dataset returning `(image, target)` after `transforms`, in image id order.

    Attributes as in the original: `img_folder`, `ann_folder` (the PNGs), `ann_file` (the panoptic JSON);
    plus `ids`, `categories` (the JSON's list), `is_thing_map` {category_id: bool} and `instances_file`.
    """

    def __init__(self, img_folder: Union[str, Path], ann_folder: Union[str, Path], ann_file: Union[str, Path],
                 transforms: Optional[Callable] = None, return_masks: bool = True,
                 num_classes: Optional[int] = None, instances_file: Union[str, Path, None] = None):
        self.img_folder = Path(img_folder)
        self.ann_folder = Path(ann_folder)
        self.ann_file = Path(ann_file)
        self.instances_file = Path(instances_file) if instances_file is not None else None
        for path, what in ((self.img_folder, "image folder"), (self.ann_folder, "panoptic PNG folder")):
            if not path.is_dir():
                raise UserFileNotFoundError(f"{what} {path} not found")
        if not self.ann_file.is_file():
            raise UserFileNotFoundError(f"panoptic annotation file {self.ann_file} not found (expected "
                                    f"<coco_panoptic_path>/annotations/panoptic_{{train,val}}2017.json)")
        data = load_json(self.ann_file)
        check_panoptic_annotations(data, self.ann_file, num_classes)
        self.categories: list[dict] = data["categories"]
        self.is_thing_map: dict[int, bool] = {c["id"]: bool(c["isthing"]) for c in self.categories}
        self.images = {img["id"]: img for img in data["images"]}
        self.annotations = {ann["image_id"]: ann for ann in data["annotations"]}
        self.ids = sorted(self.images)
        self.transforms = transforms
        self.return_masks = return_masks
        self._detection_api: Optional[COCO] = None

    def __len__(self) -> int:
        return len(self.ids)

    def detection_api(self) -> COCO:
        """pycocotools index of the detection annotations of the same split (for box / mask AP)."""
        if self._detection_api is None:
            if self.instances_file is None or not self.instances_file.is_file():
                raise UserFileNotFoundError(
                    f"box/mask AP of a panoptic dataset is computed against the detection annotations of the same "
                    f"images, as in the original DETR: {self.instances_file} not found (expected "
                    f"<coco_path>/annotations/instances_{{train,val}}2017.json beside {self.img_folder})")
            data = load_json(self.instances_file)
            check_coco_annotations(data, self.instances_file)
            self._detection_api = coco_from_dict(data)
        return self._detection_api

    def load_masks(self, image_id: int, size: tuple[int, int]) -> torch.Tensor:
        """[N, H, W] bool masks of the segments of `image_id`, in segments_info order; `size` = (w, h)."""
        ann = self.annotations[image_id]
        path = self.ann_folder / ann["file_name"]
        if not path.is_file():
            raise UserFileNotFoundError(f"panoptic PNG {path} (image_id {image_id}, from {self.ann_file}) not found")
        png = load_image(path, image_id, self.ann_file, mode="RGB")
        if png.size != size:
            raise DatasetError(f"panoptic PNG {path} is {png.size[0]}x{png.size[1]} but its image (image_id "
                               f"{image_id}) is {size[0]}x{size[1]}")
        id_map = rgb2id(np.asarray(png))  # [H, W]
        segment_ids = np.array([s["id"] for s in ann["segments_info"]], dtype=np.int64)
        masks = id_map[None] == segment_ids[:, None, None]  # [N, H, W]
        absent = segment_ids[~masks.any(axis=(1, 2))]
        if len(absent):
            raise DatasetError(f"panoptic PNG {path} (image_id {image_id}) has no pixel of segment id(s) "
                               f"{absent.tolist()} listed in {self.ann_file}")
        unlisted = (id_map != 0) & ~masks.any(axis=0)
        if unlisted.any():
            raise DatasetError(f"panoptic PNG {path} (image_id {image_id}) has segment id(s) "
                               f"{np.unique(id_map[unlisted]).tolist()} that {self.ann_file} does not list")
        return torch.from_numpy(masks)

    def __getitem__(self, idx: int):
        image_id = self.ids[idx]
        img = load_image(self.img_folder / self.images[image_id]["file_name"], image_id, self.ann_file)
        w, h = img.size
        segments = self.annotations[image_id]["segments_info"]

        masks = self.load_masks(image_id, (w, h))  # [N, H, W] bool, also without return_masks: the boxes need them
        target = {
            # [N, 4] (x0, y0, x1, y1) absolute, around each mask with the last pixel's index as x1 / y1 (as the
            # original; the JSON's bbox ends one pixel further)
            "boxes": masks_to_boxes(masks),
            "labels": torch.tensor([s["category_id"] for s in segments], dtype=torch.int64),
            "image_id": torch.tensor([image_id]),
            "area": torch.tensor([s["area"] for s in segments], dtype=torch.float32),
            "iscrowd": torch.tensor([s["iscrowd"] for s in segments], dtype=torch.int64),
            "orig_size": torch.as_tensor([int(h), int(w)]),
            "size": torch.as_tensor([int(h), int(w)]),
        }
        if self.return_masks:
            target["masks"] = masks
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target

    def get_height_and_width(self, idx: int) -> tuple[int, int]:
        img = self.images[self.ids[idx]]
        return img["height"], img["width"]


def panoptic_png_folder(coco_panoptic_path: Path, image_set: str) -> Path:
    """`<coco_panoptic_path>/panoptic_<split>2017` (the original's layout) or, failing that,
    `<coco_panoptic_path>/annotations/panoptic_<split>2017` (where COCO's archive unpacks)."""
    name = f"panoptic_{image_set}2017"
    candidates = [coco_panoptic_path / name, coco_panoptic_path / "annotations" / name]
    for folder in candidates:
        if folder.is_dir():
            return folder
    hint = ""
    archive = coco_panoptic_path / "annotations" / f"{name}.zip"
    if archive.is_file():
        hint = f"; unzip {archive} first"
    raise UserFileNotFoundError(f"panoptic PNG folder not found: looked for {candidates[0]} and {candidates[1]}{hint}")


def build(image_set: str, args) -> CocoPanoptic:
    if image_set not in ("train", "val"):
        raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
    for flag, holds in (("coco_path", "train2017/, val2017/ and annotations/instances_*.json"),
                        ("coco_panoptic_path", "annotations/panoptic_*.json and the panoptic_*2017/ PNG folders")):
        if not getattr(args, flag, None):
            raise UserValueError(f"--dataset_file {getattr(args, 'dataset_file', 'coco_panoptic')} needs --{flag}, "
                             f"the folder holding {holds}")
    coco_root, panoptic_root = Path(args.coco_path), Path(args.coco_panoptic_path)
    for root, flag in ((coco_root, "coco_path"), (panoptic_root, "coco_panoptic_path")):
        if not root.is_dir():
            raise UserFileNotFoundError(f"folder {root} (--{flag}) not found")
    return CocoPanoptic(
        img_folder=coco_root / f"{image_set}2017",
        ann_folder=panoptic_png_folder(panoptic_root, image_set),
        ann_file=panoptic_root / "annotations" / f"panoptic_{image_set}2017.json",
        transforms=transforms_from_args(image_set, args),
        return_masks=getattr(args, "masks", False),
        num_classes=getattr(args, "num_classes", None),
        instances_file=coco_root / "annotations" / f"instances_{image_set}2017.json",
    )
