"""COCO detection dataset: images + instance annotations in the original COCO layout.

    <coco_path>/train2017/*.jpg    <coco_path>/annotations/instances_train2017.json
    <coco_path>/val2017/*.jpg      <coco_path>/annotations/instances_val2017.json

The annotation file is checked when the dataset is built (cheap, linear loops only) so that a bad
file fails early with a message naming the file and the offending item; image files are checked
when they are loaded.
"""
import contextlib
import io
import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import PIL.Image
import torch
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from util.errors import UserError, UserFileNotFoundError, UserValueError

from . import transforms as T


class DatasetError(UserError, ValueError):
    """A dataset file exists but its content is not what the loader expects."""


def load_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"malformed JSON in {path}: {e.msg} at line {e.lineno}, column {e.colno} "
                           f"(char {e.pos})") from e


def check_coco_annotations(data: Any, ann_file: Path, num_classes: Optional[int] = None,
                           require_masks: bool = False) -> None:
    """Raise DatasetError if `data` is not a usable COCO instances dict (with a 'segmentation' on every
    annotation when `require_masks`)."""
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"{ann_file}: expected a COCO dict with 'images' and 'annotations', found {found}")
    if not data["images"]:
        raise DatasetError(f"{ann_file}: empty split, 'images' has no entries")
    image_ids = {img["id"] for img in data["images"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in image_ids:
            raise DatasetError(f"{ann_file}: annotation id {ann.get('id')} refers to image_id "
                               f"{ann['image_id']}, which is not in 'images'")
        if require_masks and not ann.get("segmentation"):
            raise DatasetError(f"{ann_file}: annotation id {ann.get('id')} (image_id {ann['image_id']}) has no "
                               f"'segmentation', but masks were asked for (--masks): this dataset has boxes only")
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
                 transforms: Optional[Callable], return_masks: bool, num_classes: Optional[int] = None):
        self.root = Path(img_folder)
        self.ann_file = Path(ann_file)
        if not self.root.is_dir():
            raise UserFileNotFoundError(f"image folder {self.root} not found (expected the COCO layout "
                                    f"<coco_path>/{{train2017,val2017}}/)")
        if not self.ann_file.is_file():
            raise UserFileNotFoundError(f"annotation file {self.ann_file} not found (expected the COCO layout "
                                    f"<coco_path>/annotations/instances_{{train,val}}2017.json)")
        data = load_json(self.ann_file)
        check_coco_annotations(data, self.ann_file, num_classes, require_masks=return_masks)
        self.coco = coco_from_dict(data)
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


def build(image_set: str, args) -> CocoDetection:
    if not getattr(args, "coco_path", None):
        raise UserValueError(f"--dataset_file {getattr(args, 'dataset_file', 'coco')} needs --coco_path, the folder "
                         f"holding train2017/, val2017/ and annotations/")
    root = Path(args.coco_path)
    if not root.is_dir():
        raise UserFileNotFoundError(f"COCO folder {root} (--coco_path) not found")
    paths = {
        "train": (root / "train2017", root / "annotations" / "instances_train2017.json"),
        "val": (root / "val2017", root / "annotations" / "instances_val2017.json"),
    }
    if image_set not in paths:
        raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
    img_folder, ann_file = paths[image_set]
    return CocoDetection(img_folder, ann_file, transforms=transforms_from_args(image_set, args),
                         return_masks=getattr(args, "masks", False),
                         num_classes=getattr(args, "num_classes", None))
