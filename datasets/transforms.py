"""Joint image + target transforms for detection, as in the original DETR.

Images are PIL images until `ToTensor`; targets are dicts holding
    boxes    [N, 4] float, (x0, y0, x1, y1) in absolute pixels (until `Normalize`)
    labels   [N] int64
    area     [N] float
    iscrowd  [N] int64
    masks    [N, H, W] bool (optional)
    size     [2] int64, (h, w) of the current image
    orig_size, image_id: passed through unchanged.
Each transform takes and returns `(image, target)`; `target` may be None for the functional ops.
Randomness comes from Python's `random` and torch's generator, like the original, so seeding both
reproduces a pipeline.
"""
import random
from typing import Any, Callable, Optional, Sequence, Union

import PIL.Image
import torch
import torch.nn.functional as F_nn
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from torchvision.ops import box_convert

Target = Optional[dict[str, Any]]


def crop(image: PIL.Image.Image, target: Target, region: Sequence[int]) -> tuple[PIL.Image.Image, Target]:
    """Crop `region` = (top, left, height, width); boxes are clamped into the window and objects whose
    clamped box (or mask, when there are no boxes) is empty are dropped."""
    cropped_image = F.crop(image, *region)
    if target is None:
        return cropped_image, None
    target = target.copy()
    i, j, h, w = region
    target["size"] = torch.tensor([h, w])
    fields = ["labels", "area", "iscrowd"]

    if "boxes" in target:
        window = torch.as_tensor([w, h], dtype=torch.float32)
        boxes = target["boxes"] - torch.as_tensor([j, i, j, i])
        boxes = torch.min(boxes.reshape(-1, 2, 2), window).clamp(min=0)  # [N, 2 corners, (x, y)]
        target["boxes"] = boxes.reshape(-1, 4)
        # area becomes the clamped box area (the mask area is not recomputed), as in the original
        target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
        fields.append("boxes")
    if "masks" in target:
        target["masks"] = target["masks"][:, i:i + h, j:j + w]
        fields.append("masks")

    if "boxes" in target or "masks" in target:
        if "boxes" in target:
            corners = target["boxes"].reshape(-1, 2, 2)
            keep = torch.all(corners[:, 1, :] > corners[:, 0, :], dim=1)
        else:
            keep = target["masks"].flatten(1).any(1)
        for field in fields:
            if field in target:
                target[field] = target[field][keep]
    return cropped_image, target


def hflip(image: PIL.Image.Image, target: Target) -> tuple[PIL.Image.Image, Target]:
    flipped_image = F.horizontal_flip(image)
    if target is None:
        return flipped_image, None
    w, _ = image.size
    target = target.copy()
    if "boxes" in target:
        # x -> w - x, swapping x0 and x1 so boxes stay (x0, y0, x1, y1)
        boxes = target["boxes"]
        target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor(
            [w, 0, w, 0])
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return flipped_image, target


def _size_with_aspect_ratio(image_size: tuple[int, int], size: int,
                            max_size: Optional[int]) -> tuple[int, int]:
    """(h, w) such that the short side is `size`, unless the long side would then exceed `max_size`."""
    w, h = image_size
    if max_size is not None:
        min_original, max_original = float(min(w, h)), float(max(w, h))
        if max_original / min_original * size > max_size:
            # the original's rounding: shrink the short side so the long side fits (round, then the
            # long side below is truncated with int()), kept for identical output sizes
            size = int(round(max_size * min_original / max_original))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image: PIL.Image.Image, target: Target, size: Union[int, Sequence[int]],
           max_size: Optional[int] = None) -> tuple[PIL.Image.Image, Target]:
    """Resize so the short side is `size` (capped by `max_size` on the long side), or to `size` = (w, h).

    Boxes are scaled by new/old width and height, areas by their product; masks use nearest
    interpolation.
    """
    if isinstance(size, (list, tuple)):
        h, w = size[::-1]  # a sequence is (w, h) here, as in the original
    else:
        h, w = _size_with_aspect_ratio(image.size, size, max_size)
    rescaled_image = F.resize(image, [h, w])  # PIL bilinear with antialiasing, like the original
    if target is None:
        return rescaled_image, None

    ratio_width = float(rescaled_image.size[0]) / float(image.size[0])
    ratio_height = float(rescaled_image.size[1]) / float(image.size[1])
    target = target.copy()
    if "boxes" in target:
        scale = torch.as_tensor([ratio_width, ratio_height, ratio_width, ratio_height])
        target["boxes"] = target["boxes"] * scale
    if "area" in target:
        target["area"] = target["area"] * (ratio_width * ratio_height)
    target["size"] = torch.tensor([h, w])
    if "masks" in target:
        masks = target["masks"][:, None].float()
        target["masks"] = F_nn.interpolate(masks, size=(h, w), mode="nearest")[:, 0] > 0.5
    return rescaled_image, target


def pad(image: PIL.Image.Image, target: Target, padding: Sequence[int]) -> tuple[PIL.Image.Image, Target]:
    """Pad `padding` = (x, y) pixels on the right and bottom only, so boxes do not move."""
    padded_image = F.pad(image, [0, 0, padding[0], padding[1]])
    if target is None:
        return padded_image, None
    target = target.copy()
    target["size"] = torch.tensor(padded_image.size[::-1])
    if "masks" in target:
        target["masks"] = F_nn.pad(target["masks"], (0, padding[0], 0, padding[1]))
    return padded_image, target


class RandomCrop:
    def __init__(self, size: Sequence[int]):
        self.size = size  # (h, w)

    def __call__(self, img, target):
        region = T.RandomCrop.get_params(img, self.size)
        return crop(img, target, region)


class RandomSizeCrop:
    """Crop a random window whose sides are drawn in [min_size, max_size] (capped by the image)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, img: PIL.Image.Image, target: dict):
        # an image smaller than min_size is kept whole on that side (the original raised ValueError)
        w = random.randint(min(self.min_size, img.width), min(img.width, self.max_size))
        h = random.randint(min(self.min_size, img.height), min(img.height, self.max_size))
        region = T.RandomCrop.get_params(img, [h, w])
        return crop(img, target, region)


class CenterCrop:
    def __init__(self, size: Sequence[int]):
        self.size = size  # (h, w)

    def __call__(self, img, target):
        image_width, image_height = img.size
        crop_height, crop_width = self.size
        top = int(round((image_height - crop_height) / 2.0))
        left = int(round((image_width - crop_width) / 2.0))
        return crop(img, target, (top, left, crop_height, crop_width))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img, target):
        if random.random() < self.p:
            return hflip(img, target)
        return img, target


class RandomResize:
    """Resize the short side to a size drawn from `sizes` (long side capped by `max_size`)."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        if not isinstance(sizes, (list, tuple)):
            raise TypeError(f"RandomResize expects a list or tuple of sizes, got {sizes!r}")
        self.sizes = sizes
        self.max_size = max_size

    def __call__(self, img, target=None):
        size = random.choice(self.sizes)
        return resize(img, target, size, self.max_size)


class RandomPad:
    def __init__(self, max_pad: int):
        self.max_pad = max_pad

    def __call__(self, img, target):
        pad_x = random.randint(0, self.max_pad)
        pad_y = random.randint(0, self.max_pad)
        return pad(img, target, (pad_x, pad_y))


class RandomSelect:
    """Apply `transforms1` with probability `p`, else `transforms2`."""

    def __init__(self, transforms1: Callable, transforms2: Callable, p: float = 0.5):
        self.transforms1 = transforms1
        self.transforms2 = transforms2
        self.p = p

    def __call__(self, img, target):
        if random.random() < self.p:
            return self.transforms1(img, target)
        return self.transforms2(img, target)


class ToTensor:
    """PIL image -> float tensor [3, H, W] in [0, 1]."""

    def __call__(self, img, target):
        image = F.to_image(img).as_subclass(torch.Tensor)
        # divide (rather than v2's multiply by 1/255) to match the original's to_tensor bit for bit
        return image.to(torch.float32).div(255), target


class RandomErasing:
    """torchvision's RandomErasing on the image tensor; the target is unchanged."""

    def __init__(self, *args, **kwargs):
        self.eraser = T.RandomErasing(*args, **kwargs)

    def __call__(self, img, target):
        return self.eraser(img), target


class Normalize:
    """Normalise the image tensor and turn boxes into (cx, cy, w, h) relative to the image size."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = mean
        self.std = std

    def __call__(self, image: torch.Tensor, target: Target = None):
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = target.copy()
        h, w = image.shape[-2:]
        if "boxes" in target:
            boxes = box_convert(target["boxes"], "xyxy", "cxcywh")
            target["boxes"] = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)  # [N, 4] normalised
        return image, target


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        lines = [f"    {t}" for t in self.transforms]
        return "\n".join([self.__class__.__name__ + "("] + lines + [")"])


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)


def make_coco_transforms(image_set: str, scales: Optional[Sequence[int]] = None, max_size: int = 1333,
                         val_size: int = 800, crop_scales: Sequence[int] = (400, 500, 600),
                         crop_size: Sequence[int] = (384, 600)) -> Compose:
    """The original's COCO augmentation; the defaults reproduce it exactly.

    train: random flip, then either a multi-scale resize (short side in `scales`, long side
    <= `max_size`) or resize to `crop_scales` + random crop of side in `crop_size` + multi-scale
    resize; an empty `crop_scales` disables the crop branch. val: short side `val_size`.
    """
    normalize = Compose([ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    scales = list(DEFAULT_SCALES if scales is None else scales)

    if image_set == "train":
        multi_scale = RandomResize(scales, max_size=max_size)
        if crop_scales:
            multi_scale = RandomSelect(
                multi_scale,
                Compose([
                    RandomResize(list(crop_scales)),
                    RandomSizeCrop(*crop_size),
                    RandomResize(scales, max_size=max_size),
                ]),
            )
        return Compose([RandomHorizontalFlip(), multi_scale, normalize])
    if image_set == "val":
        return Compose([RandomResize([val_size], max_size=max_size), normalize])
    raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
