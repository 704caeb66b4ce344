"""Reading the images a Predictor is given: files, folders, PIL images and tensors, as RGB PIL images.

Images are read as the evaluation reads them (RGB; grayscale, palette, RGBA (alpha dropped) and 16-bit images are
converted). An unreadable file raises ImageError naming it; ``ImageList`` returns the error instead, so that the
Predictor can skip that image, name it, and go on with the rest.
"""
import logging
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import PIL.Image
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

ImageInput = Union[str, Path, PIL.Image.Image, Tensor]


class ImageError(ValueError):
    """An image that cannot be read (the message names it and says why)."""


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> RGB. 16-bit and 32-bit integer images are scaled from 0..65535 to 0..255 (PIL's own
    conversion would clip them); float images are taken as 0..1 when their maximum is at most 1, else 0..255."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image).astype(np.float64)
        if image.mode.startswith("I;16") or array.max(initial=0) > 255:
            array = array / 257.0
        return PIL.Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        array = np.asarray(image).astype(np.float64)
        if array.max(initial=0) <= 1:
            array = array * 255
        return PIL.Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # what PIL asks for palette images with transparency
    return image.convert("RGB")  # L, LA, RGBA (alpha dropped, as the dataset loader does), CMYK, YCbCr, 1, ...


def read_image(path: Union[str, Path]) -> PIL.Image.Image:
    """The image file ``path`` as RGB; raises ImageError naming the file for anything unreadable or truncated."""
    path = Path(path)
    try:
        with PIL.Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            return to_rgb(img)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except PIL.Image.DecompressionBombError as err:
        raise ImageError(f"{path}: {err} (raise PIL.Image.MAX_IMAGE_PIXELS to read it anyway)") from None
    except (OSError, SyntaxError, ValueError, PIL.UnidentifiedImageError) as err:
        raise ImageError(f"{path}: not a readable image ({err})") from None


def check_tensor(tensor: Tensor, where: str) -> None:
    """Raises ImageError unless ``tensor`` is an RGB (or one-channel) image [3, H, W]: uint8 0..255, or float 0..1
    as torchvision's to_tensor gives (not normalised)."""
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ImageError(f"{where}: expected an image tensor [3, H, W] (or [1, H, W]), got shape {list(tensor.shape)}")
    if tensor.is_floating_point():
        lo, hi = float(tensor.min()), float(tensor.max())
        if lo < 0 or hi > 1:
            raise ImageError(f"{where}: a float image tensor must hold values in [0, 1] (not normalised), got "
                             f"[{lo:.3g}, {hi:.3g}]; pass the unnormalised image (or a uint8 tensor)")
    elif tensor.dtype != torch.uint8:
        raise ImageError(f"{where}: expected a uint8 or float image tensor, got {tensor.dtype}")


def tensor_to_image(tensor: Tensor, where: str) -> PIL.Image.Image:
    """An image tensor (see ``check_tensor``) -> an RGB PIL image; float images are quantised to 8 bits, as an
    image file would be."""
    check_tensor(tensor, where)
    tensor = tensor.detach().cpu()
    array = tensor if tensor.dtype == torch.uint8 else (tensor * 255).round().to(torch.uint8)
    if array.shape[0] == 1:
        array = array.expand(3, -1, -1)
    return PIL.Image.fromarray(array.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def expand_inputs(images: Union[ImageInput, Sequence[ImageInput]]) -> list:
    """Paths (files and folders; a folder's image files in name order, not recursively), PIL images and tensors ->
    a flat list. Raises ValueError for an empty folder, a missing path, an invalid tensor, or no input at all."""
    if isinstance(images, (str, Path, PIL.Image.Image, Tensor)):
        images = [images]
    out: list = []
    seen: set = set()
    for item in images:
        if not isinstance(item, (str, Path)):
            if not isinstance(item, (PIL.Image.Image, Tensor)):
                raise TypeError(f"expected image paths, folders, PIL images or tensors, got {type(item).__name__}")
            if isinstance(item, Tensor):  # a bad object is the caller's mistake: raised, not skipped like a bad file
                check_tensor(item, f"<input {len(out)}>")
            out.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
            found = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not found:
                raise ValueError(f"folder {path} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)})")
            if len(found) < len(files):
                others = [p.name for p in files if p not in found]
                logger.info("%s: %d files that are not images (by extension) are not read: %s%s", path, len(others),
                            ", ".join(others[:5]), " ..." if len(others) > 5 else "")
            candidates = found
        elif path.exists():
            candidates = [path]  # a file given by name is tried whatever its extension
        else:
            raise ValueError(f"{path}: no such file or folder")
        for p in candidates:
            key = p.resolve()
            if key in seen:
                logger.info("%s: given more than once, read once", p)
                continue
            seen.add(key)
            out.append(p)
    if not out:
        raise ValueError("no images given")
    return out


def describe(source, index: int) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"<input {index}>"


class ImageList(torch.utils.data.Dataset):
    """(index, image or None, model input or error message) per source; read errors are returned, not raised,
    so that one bad file neither stops the loader nor its workers."""

    def __init__(self, sources: list, transform):
        self.sources = sources
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        source = self.sources[index]
        try:
            if isinstance(source, (str, Path)):
                image = read_image(source)
            elif isinstance(source, Tensor):
                image = tensor_to_image(source, describe(source, index))
            else:
                image = to_rgb(source)
        except ImageError as err:
            return index, None, str(err)
        tensor, _ = self.transform(image, None)  # [3, h, w] resized and normalised, as evaluation does
        return index, image, tensor
