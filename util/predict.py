"""Run a trained DETR on your own images: a command and a Python API.

    # a checkpoint of this repository (or of the original), on a folder and a single file
    python -m util.predict --resume runs/synthetic/checkpoint.pth --images photos/ cat.jpg --output_dir out
    # a published model through torch.hub's cache (downloaded once), with the paper's attention figures
    python -m util.predict --hub detr_resnet50 --images photos/ --output_dir out --threshold 0.9 --attention

It writes, in --output_dir,
    <name>.png             the image with its detections (boxes, class names and scores; masks / panoptic segments
                           for segmentation models)
    <name>_attention.png   with --attention: decoder cross-attention of the detections, encoder self-attention at
                           their box centres (the paper's figures)
    results.json           COCO box results (image_id, category_id, bbox [x, y, w, h] in pixels, score) of every
                           query, whatever --threshold (which only chooses what is drawn), as the evaluation
                           scores them: what pycocotools' ``COCO.loadRes`` reads; COCOeval of it against the images'
                           annotations gives main.py --eval's numbers (same val_size / max_size, --batch_size 1)
    results_segm.json      mask models: the same for the masks (RLE 'segmentation', no 'bbox', so that loadRes
                           takes each area from its mask, as the evaluation does)
    images.json            the COCO 'images' and 'categories' the results refer to, so that
                           ``COCO('images.json').loadRes('results.json')`` works without ground truth
    panoptic.json + panoptic/<name>.png    for panoptic models, in the COCO panoptic format
Image ids are the file names' numbers when every name is a number (COCO's and the synthetic data's
000000139.jpg -> 139, so the results can be evaluated against their annotations), else 1, 2, ... in input order.

Python, with a checkpoint, a hub model or any DETR you built:

    from util.predict import Predictor, predict
    predictor = Predictor.from_checkpoint("runs/synthetic/checkpoint.pth")   # or Predictor.from_hub("detr_resnet50")
    for p in predictor(["a.jpg", "photos/", pil_image, uint8_tensor], score_threshold=0.7):
        print(p.source, p.names, p.scores, p.boxes)   # boxes [N, 4] (x0, y0, x1, y1) in the image's pixels
    predictions = predict(model, images, category_names="coco")   # a bare model: say what its classes are

Images are read as the evaluation reads them (RGB; grayscale, palette, RGBA (alpha dropped) and 16-bit images are
converted) and resized as evaluation does (short side ``val_size``, long side at most ``max_size``: the
checkpoint's values, 800 / 1333 for the published models). Unreadable files are skipped, named, and the rest goes on.
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from torch import Tensor, nn

from datasets.coco_categories import COCO_CATEGORY_NAMES, COCO_PANOPTIC_CATEGORY_NAMES, COCO_PANOPTIC_THING_IDS
from datasets.coco_eval import prepare_for_coco_detection, prepare_for_coco_segmentation
from datasets.transforms import make_coco_transforms
from models.detr import PostProcess
from models.segmentation import DETRsegm, PostProcessPanoptic, PostProcessSegm, rgb2id
from models.transformer import capture_attention
from util.nested_tensor import nested_tensor_from_tensor_list

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

ImageInput = Union[str, Path, PIL.Image.Image, Tensor]
CategoryNames = Union[None, str, Dict[int, str]]


class ImageError(ValueError):
    """An image that cannot be read (the message names it and says why)."""


@dataclass
class Prediction:
    """The detections of one image, in the pixels of the image as given (before the evaluation resize).

    Detections are in query order; ``queries`` says which query made each one (its row in the attention maps).
    """
    source: str                      # the file, or "<input i>" for an image given as an object
    image: PIL.Image.Image           # the RGB image the model saw, before resizing
    scores: Tensor                   # [N] class probability of the best class (no-object excluded)
    labels: Tensor                   # [N] category ids
    boxes: Tensor                    # [N, 4] (x0, y0, x1, y1) in pixels of `image`
    names: List[str]                 # [N] category names (the id as text when the names are unknown)
    queries: Tensor                  # [N] query index of each detection
    input_size: tuple                # (h, w) after the evaluation resize, as the model saw it
    masks: Optional[Tensor] = None   # [N, H, W] bool, for mask models
    panoptic: Optional[dict] = None  # {'segmentation': [H, W] int64 segment ids, 'segments_info': [...]}
    # with attention=True, per layer, cut to this image's feature map (h, w): 'encoder.{i}.self_attn' [h, w, h, w],
    # 'decoder.{i}.cross_attn' [num_queries, h, w], 'decoder.{i}.self_attn' [num_queries, num_queries]
    attention: Optional[Dict[str, Tensor]] = None

    @property
    def size(self) -> tuple:
        """(h, w) of the image."""
        return self.image.height, self.image.width

    def above(self, score_threshold: float) -> "Prediction":
        """The detections whose score exceeds ``score_threshold`` (the panoptic segmentation and the attention
        maps, which do not depend on it, are kept)."""
        keep = self.scores > score_threshold
        return dataclasses.replace(
            self, scores=self.scores[keep], labels=self.labels[keep], boxes=self.boxes[keep],
            names=[n for n, k in zip(self.names, keep.tolist()) if k], queries=self.queries[keep],
            masks=None if self.masks is None else self.masks[keep])


# ----------------------------------------------------------------------------------------------
# Reading images


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


class _ImageList(torch.utils.data.Dataset):
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


# ----------------------------------------------------------------------------------------------
# Building models and their metadata


def resolve_category_names(names: CategoryNames) -> Optional[Dict[int, str]]:
    """None, 'coco', 'coco_panoptic', a {id: name} dict, or a JSON file: a COCO annotation file (its
    'categories') or a {id: name} object."""
    if names is None or isinstance(names, dict):
        return None if names is None else {int(k): str(v) for k, v in names.items()}
    if names == "coco":
        return dict(COCO_CATEGORY_NAMES)
    if names == "coco_panoptic":
        return dict(COCO_PANOPTIC_CATEGORY_NAMES)
    path = Path(names)
    if not path.is_file():
        raise ValueError(f"category names {names!r}: expected 'coco', 'coco_panoptic' or a JSON file")
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "categories" in data:
        try:
            return {int(c["id"]): str(c["name"]) for c in data["categories"]}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: 'categories' must be a list of {{'id', 'name'}} objects ({err})") from None
    if isinstance(data, dict):
        try:
            return {int(k): str(v) for k, v in data.items()}
        except ValueError:
            pass
    raise ValueError(f"{path}: expected a COCO annotation file (with 'categories') or a JSON object {{id: name}}")


def thing_ids_from_file(names: CategoryNames) -> Optional[List[int]]:
    """The thing ids of a COCO panoptic categories file ('isthing'), when ``names`` is one."""
    if names == "coco_panoptic":
        return list(COCO_PANOPTIC_THING_IDS)
    if isinstance(names, (str, Path)) and Path(names).is_file():
        data = json.loads(Path(names).read_text())
        if isinstance(data, dict) and all("isthing" in c for c in data.get("categories") or [{}]):
            return [int(c["id"]) for c in data["categories"] if c["isthing"]]
    return None


def _published(source: str) -> Optional[str]:
    """The hub entrypoint whose published checkpoint ``source`` is (by URL or file name), if any."""
    import hubconf

    for name, url in hubconf._URLS.items():
        if source == url or Path(source).name == Path(url).name:
            return name
    return None


def _num_classes_of(state_dict: dict) -> int:
    for key in ("class_embed.bias", "detr.class_embed.bias"):
        if key in state_dict:
            return int(state_dict[key].shape[0]) - 1
    raise ValueError("the checkpoint's model has no class head (class_embed.bias): is it a DETR checkpoint?")


class Predictor:
    """A model ready for inference with what it needs to read images and name its classes.

    ``category_names``: {category id: name}, 'coco', 'coco_panoptic', a JSON file, or None (labels are shown as
    their ids, said once). ``thing_ids``: for a mask model, the category ids that are things; with them the
    predictions also get a panoptic segmentation (``panoptic_threshold``: minimum class confidence of a segment,
    0.85 as the original). ``val_size`` / ``max_size``: the evaluation resize. ``amp``: 'off', 'bf16' or 'fp16'
    (autocast around the forward pass). The model is moved to ``device`` and put in eval mode.
    """

    def __init__(self, model: nn.Module, category_names: CategoryNames = None,
                 thing_ids: Optional[Iterable[int]] = None, val_size: int = 800, max_size: int = 1333,
                 device: Union[str, torch.device, None] = None, amp: str = "off", panoptic_threshold: float = 0.85):
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.category_names = resolve_category_names(category_names)
        if thing_ids is None:
            thing_ids = thing_ids_from_file(category_names)
        self.thing_ids = None if thing_ids is None else sorted(int(i) for i in thing_ids)
        self.val_size, self.max_size = int(val_size), int(max_size)
        self.transform = make_coco_transforms("val", val_size=self.val_size, max_size=self.max_size)
        self.amp = amp
        self.panoptic_threshold = panoptic_threshold
        self.masks = isinstance(model, DETRsegm)
        self._said_numeric = False
        if self.thing_ids is not None and not self.masks:
            logger.info("thing ids given, but the model predicts no masks: no panoptic output")

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, checkpoint: str, device: Union[str, torch.device, None] = None,
                        category_names: CategoryNames = None, **kwargs) -> "Predictor":
        """A model built as main.py builds it, from the parser's defaults plus the checkpoint's ``args``, with its
        weights. Category names: ``category_names`` if given, else the checkpoint's ``args.category_names``, else
        COCO's for the published checkpoints, else the ids (said once). Thing ids: ``args.thing_ids`` likewise.
        ``val_size`` / ``max_size`` default to the checkpoint's."""
        from models import build_model
        from util.args import get_args_parser
        from util.checkpoint import load_checkpoint, load_model_state

        ckpt = load_checkpoint(checkpoint)
        ckpt_args = dict(ckpt.get("args") or {})
        args = get_args_parser().parse_args([])
        for key, value in ckpt_args.items():
            setattr(args, key, value)
        if getattr(args, "num_classes", None) is None:
            args.num_classes = _num_classes_of(ckpt["model"])
        args.device = "cpu"
        args.backbone_weights = "none"  # the checkpoint holds the backbone: never read or download other weights
        args.frozen_weights = None
        args.aux_loss = False  # inference needs the last decoder layer only (the heads are shared)
        published = _published(checkpoint)
        thing_ids = kwargs.pop("thing_ids", None)
        if thing_ids is None:
            thing_ids = ckpt_args.get("thing_ids")
        if thing_ids is None and (args.dataset_file == "coco_panoptic" or
                                  (published or "").endswith("panoptic")):
            thing_ids = list(COCO_PANOPTIC_THING_IDS)
        args.thing_ids = thing_ids
        model, _, _ = build_model(args)
        load_model_state(model, ckpt["model"], source=checkpoint)

        if category_names is None:
            category_names = ckpt_args.get("category_names")
            if category_names is not None:
                logger.info("category names: from the checkpoint (%d categories)", len(category_names))
            elif published is not None:
                category_names = "coco_panoptic" if published.endswith("panoptic") else "coco"
                logger.info("category names: COCO's (%s is a published COCO checkpoint)", checkpoint)
        for key in ("val_size", "max_size"):
            if kwargs.get(key) is None:
                kwargs[key] = getattr(args, key)
        return cls(model, category_names=category_names, thing_ids=thing_ids, device=device, **kwargs)

    @classmethod
    def from_hub(cls, name: str, pretrained: bool = True, device: Union[str, torch.device, None] = None,
                 **kwargs) -> "Predictor":
        """A ``hubconf`` model (``detr_resnet50``, ``detr_resnet50_panoptic``, ...) with COCO's category names.
        ``pretrained`` loads the published weights through the torch hub cache (downloaded when absent)."""
        import hubconf

        if name not in hubconf._URLS:
            raise ValueError(f"unknown hub model {name!r}; expected one of {', '.join(sorted(hubconf._URLS))}")
        model = getattr(hubconf, name)(pretrained=pretrained)
        panoptic = name.endswith("panoptic")
        kwargs.setdefault("category_names", "coco_panoptic" if panoptic else "coco")
        if panoptic:
            kwargs.setdefault("thing_ids", COCO_PANOPTIC_THING_IDS)
        return cls(model, device=device, **kwargs)

    # -- inference ---------------------------------------------------------------------------

    def names_of(self, labels: Iterable[int]) -> List[str]:
        if self.category_names is None:
            if not self._said_numeric:
                logger.warning("category names unknown (none in the checkpoint, none given): predictions are labelled "
                               "with their category ids; to name them pass --categories coco|coco_panoptic|FILE.json "
                               "(category_names= in Python)")
                self._said_numeric = True
            return [str(int(label)) for label in labels]
        return [self.category_names.get(int(label), str(int(label))) for label in labels]

    def _autocast(self):
        dtype = AMP_DTYPES[self.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def iter_predict(self, images: Union[ImageInput, Sequence[ImageInput]], score_threshold: Optional[float] = 0.7,
                     batch_size: int = 1, attention: bool = False, num_workers: int = 0,
                     skipped: Optional[list] = None, progress: bool = False) -> Iterator[Prediction]:
        """Predictions one image at a time, in input order, of the queries scoring above ``score_threshold``
        (None: every query, as COCO evaluation ranks them); unreadable images are logged, appended to
        ``skipped`` as (source, reason) and left out. ``batch_size`` images of different sizes are padded into one
        batch, as in evaluation (their predictions differ very slightly from one-by-one ones: the backbone
        sees the padding at their borders)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        sources = expand_inputs(images)
        loader = torch.utils.data.DataLoader(_ImageList(sources, self.transform), batch_size=batch_size,
                                             num_workers=num_workers, collate_fn=list)
        bar = _progress(len(sources), progress)
        try:
            for batch in loader:
                good = []
                for index, image, item in batch:
                    if image is None:
                        logger.warning("skipped %s", item)
                        if skipped is not None:
                            skipped.append((describe(sources[index], index), item))
                    else:
                        good.append((index, image, item))
                if good:
                    yield from self._predict_batch(good, sources, score_threshold, attention)
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()

    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]], score_threshold: Optional[float] = 0.7,
                 batch_size: int = 1, attention: bool = False, **kwargs) -> List[Prediction]:
        """All predictions as a list (see ``iter_predict``)."""
        return list(self.iter_predict(images, score_threshold, batch_size, attention, **kwargs))

    def _predict_batch(self, batch: list, sources: list, score_threshold: Optional[float],
                       attention: bool) -> List[Prediction]:
        images = [image for _, image, _ in batch]
        samples = nested_tensor_from_tensor_list([t for _, _, t in batch]).to(self.device)
        input_sizes = torch.tensor([list(t.shape[-2:]) for _, _, t in batch])  # [B, 2] (h, w) resized
        orig_sizes = torch.tensor([[im.height, im.width] for im in images])    # [B, 2] (h, w) as given
        transformer = (self.model.detr if self.masks else self.model).transformer
        feature_mask: list = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            recorded = stack.enter_context(capture_attention(transformer)) if attention else None
            if attention:  # the padding mask of the feature map, to cut each image's maps out of the batch's
                hook = transformer.register_forward_pre_hook(lambda m, a: feature_mask.append(a[1].cpu()))
                stack.callback(hook.remove)
            with self._autocast():
                outputs = self.model(samples)
        outputs = {k: v.float() for k, v in outputs.items() if isinstance(v, Tensor)}

        results = PostProcess()(outputs, orig_sizes.to(self.device))
        lowest = -1.0 if score_threshold is None else score_threshold  # scores are probabilities: -1 keeps all
        keeps = [r["scores"] > lowest for r in results]
        queries = [keep.nonzero()[:, 0].cpu() for keep in keeps]
        if self.masks:
            # filters scores, labels and boxes by the same threshold and adds [N, 1, H, W] uint8 masks
            results = PostProcessSegm(score_threshold=score_threshold)(results, outputs, orig_sizes, input_sizes)
        else:
            results = [{k: v[keep] for k, v in r.items()} for r, keep in zip(results, keeps)]
        panoptic = None
        if self.masks and self.thing_ids is not None:
            panoptic = PostProcessPanoptic(self._is_thing_map(outputs), threshold=self.panoptic_threshold)(
                outputs, input_sizes, orig_sizes)

        predictions = []
        for i, ((index, image, _), r) in enumerate(zip(batch, results)):
            labels = r["labels"].cpu()
            pred = Prediction(source=describe(sources[index], index), image=image, scores=r["scores"].cpu(),
                              labels=labels, boxes=r["boxes"].cpu(), names=self.names_of(labels.tolist()),
                              queries=queries[i], input_size=tuple(input_sizes[i].tolist()))
            if self.masks:
                pred.masks = r["masks"][:, 0].bool().cpu()
            if panoptic is not None:
                pred.panoptic = _decode_panoptic(panoptic[i], self)
            if attention:
                pred.attention = _image_attention(recorded, feature_mask[0], i)
            predictions.append(pred)
        return predictions

    def _is_thing_map(self, outputs: dict) -> Dict[int, bool]:
        """{category id: is a thing} over the named categories (or every class id when names are unknown)."""
        ids = (self.category_names.keys() if self.category_names is not None
               else range(outputs["pred_logits"].shape[-1] - 1))
        things = set(self.thing_ids or [])
        return {int(i): int(i) in things for i in ids}


def predict(model: nn.Module, images: Union[ImageInput, Sequence[ImageInput]], score_threshold: float = 0.7,
            category_names: CategoryNames = None, batch_size: int = 1, attention: bool = False, **kwargs
            ) -> List[Prediction]:
    """``Predictor(model, category_names, **kwargs)(images, score_threshold, batch_size, attention)`` in one call,
    for a model you already have (e.g. from ``torch.hub.load``: pass ``category_names='coco'``)."""
    predictor_keys = ("thing_ids", "val_size", "max_size", "device", "amp", "panoptic_threshold")
    predictor = Predictor(model, category_names=category_names,
                          **{k: kwargs.pop(k) for k in predictor_keys if k in kwargs})
    return predictor(images, score_threshold=score_threshold, batch_size=batch_size, attention=attention, **kwargs)


def _decode_panoptic(result: dict, predictor: Predictor) -> dict:
    """PostProcessPanoptic's PNG -> an id map [H, W] (int64) and segments_info with category names."""
    import io

    with PIL.Image.open(io.BytesIO(result["png_string"])) as png:
        segmentation = torch.from_numpy(rgb2id(np.asarray(png.convert("RGB"))))
    segments = [dict(s, name=predictor.names_of([s["category_id"]])[0]) for s in result["segments_info"]]
    return {"segmentation": segmentation, "segments_info": segments, "png_string": result["png_string"]}


def _image_attention(recorded: Dict[str, Tensor], mask: Tensor, i: int) -> Dict[str, Tensor]:
    """Image i's attention maps, reshaped to its feature map (h, w) and cut out of the padded batch's.

    ``mask`` [B, H, W] is the feature map's padding mask (True on padding, at the bottom and the right)."""
    full_h, full_w = mask.shape[-2:]
    h = int((~mask[i, :, 0]).sum())
    w = int((~mask[i, 0, :]).sum())
    out = {}
    for key, weights in recorded.items():
        weights = weights[i].float().cpu()
        if key.endswith("cross_attn"):  # [Q, HW] -> [Q, h, w]
            out[key] = weights.view(-1, full_h, full_w)[:, :h, :w].contiguous()
        elif key.startswith("encoder"):  # [HW, HW] -> [h, w, h, w]
            out[key] = weights.view(full_h, full_w, full_h, full_w)[:h, :w, :h, :w].contiguous()
        else:  # decoder self-attention among the queries [Q, Q]
            out[key] = weights
    return out


def _progress(total: int, enabled: bool):
    if not enabled or total < 2:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# Output files


def output_names(sources: Sequence[str]) -> List[str]:
    """A distinct file stem per image: its file's stem; the parent folder's name is prepended, then a counter
    appended, where two images would get the same one."""
    stems = [Path(s).stem if not s.startswith("<input") else f"input_{s[7:-1].strip()}" for s in sources]
    counts: Dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    names, used = [], set()
    for source, stem in zip(sources, stems):
        name = stem if counts[stem] == 1 else f"{Path(source).parent.name}_{stem}"
        base, k = name, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def image_ids(sources: Sequence[str]) -> List[int]:
    """COCO image ids: the file names' numbers when every name is a distinct number, else 1..N in input order."""
    stems = [Path(s).stem for s in sources]
    if all(s.isdigit() for s in stems) and len(set(map(int, stems))) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(sources) + 1))


def coco_results(prediction: Prediction, image_id: int) -> Dict[str, List[dict]]:
    """COCO results of one image, built as the evaluation builds them (``datasets.coco_eval``): 'bbox' (bbox
    [x, y, w, h] in pixels, score, category_id) and, for mask models, 'segm' (an RLE 'segmentation' instead of the
    box: pycocotools' loadRes takes the area of an entry with a box from the box)."""
    fields = {"scores": prediction.scores, "labels": prediction.labels, "boxes": prediction.boxes}
    out = {"bbox": prepare_for_coco_detection(image_id, fields)}
    if prediction.masks is not None:
        out["segm"] = prepare_for_coco_segmentation(image_id, dict(fields, masks=prediction.masks[:, None]))
    return out


def write_json(path: Path, data: Any) -> None:
    from util.checkpoint import atomic_write

    with atomic_write(str(path), "w") as f:
        json.dump(data, f)


def write_png(path: Path, data: bytes) -> None:
    from util.checkpoint import atomic_write

    with atomic_write(str(path), "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------------------------
# The command


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m util.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--resume", help="checkpoint to run (path or URL; this repository's or the original's)")
    model.add_argument("--hub", help="published model by hub name (detr_resnet50, detr_resnet50_panoptic, ...), "
                                     "from the torch hub cache or downloaded")
    parser.add_argument("--images", nargs="+", required=True, help="image files and folders (their image files)")
    parser.add_argument("--output_dir", required=True, help="where the PNGs and JSON files go")
    parser.add_argument("--threshold", default=0.7, type=float,
                        help="draw detections whose class probability exceeds this (the JSON results hold every "
                             "query, as the evaluation scores them)")
    parser.add_argument("--panoptic_threshold", default=0.85, type=float,
                        help="panoptic models: minimum class probability of a segment (the original's 0.85)")
    parser.add_argument("--categories", default=None,
                        help="category names: coco, coco_panoptic or a JSON file (a COCO annotation file or "
                             "{id: name}); default: the checkpoint's, COCO's for published models")
    parser.add_argument("--batch_size", default=1, type=int,
                        help="images per forward pass (padded to a common size, as in evaluation)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="off", choices=sorted(AMP_DTYPES),
                        help="mixed precision of the forward pass (torch.autocast)")
    parser.add_argument("--val_size", default=None, type=int, help="short side after resizing (default: the model's)")
    parser.add_argument("--max_size", default=None, type=int, help="long side at most (default: the model's)")
    parser.add_argument("--num_workers", default=0, type=int, help="image reading processes")
    parser.add_argument("--attention", action="store_true",
                        help="also draw <name>_attention.png: decoder cross-attention of the detections and "
                             "encoder self-attention at their box centres")
    parser.add_argument("--max_attention", default=4, type=int, help="detections shown in the attention figures")
    parser.add_argument("--no_draw", action="store_true", help="write the JSON files only")
    parser.add_argument("--overwrite", action="store_true", help="replace output files of an earlier run")
    return parser


def planned_files(output_dir: Path, names: Sequence[str], draw: bool, attention: bool, panoptic: bool,
                  masks: bool = False) -> List[Path]:
    files = [output_dir / "results.json", output_dir / "images.json"]
    if masks:
        files.append(output_dir / "results_segm.json")
    if panoptic:
        files.append(output_dir / "panoptic.json")
        files += [output_dir / "panoptic" / f"{n}.png" for n in names]
    if draw:
        files += [output_dir / f"{n}.png" for n in names]
    if attention:
        files += [output_dir / f"{n}_attention.png" for n in names]
    return files


def run(args: argparse.Namespace) -> dict:
    """The command: returns a summary {'images', 'skipped', 'detections', 'seconds', 'files'}."""
    from util import visualize

    output_dir = Path(args.output_dir)
    sources = expand_inputs(args.images)  # fails early on an empty folder or a missing path
    names = output_names([describe(s, i) for i, s in enumerate(sources)])
    kwargs = dict(device=args.device, amp=args.amp, panoptic_threshold=args.panoptic_threshold,
                  val_size=args.val_size, max_size=args.max_size)
    if args.hub:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if args.categories is not None:
            kwargs["category_names"] = args.categories
        predictor = Predictor.from_hub(args.hub, **kwargs)
    else:
        predictor = Predictor.from_checkpoint(args.resume, category_names=args.categories, **kwargs)
    panoptic = predictor.masks and predictor.thing_ids is not None
    draw = not args.no_draw
    existing = [p for p in planned_files(output_dir, names, draw, args.attention, panoptic, predictor.masks)
                if p.exists()]
    if existing and not args.overwrite:
        more = f" (and {len(existing) - 1} more output files)" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]} exists{more}: pass --overwrite to replace the outputs of an earlier run, "
                              f"or choose another --output_dir")
    output_dir.mkdir(parents=True, exist_ok=True)

    ids = image_ids([describe(s, i) for i, s in enumerate(sources)])
    name_of = {describe(s, i): (n, image_id) for i, (s, n, image_id) in enumerate(zip(sources, names, ids))}
    results: Dict[str, List[dict]] = {"bbox": [], "segm": []}
    images, panoptic_annotations, skipped = [], [], []
    num_detections, start = 0, time.perf_counter()
    # every query, as the evaluation ranks them (the JSON results); --threshold only chooses what is drawn
    for everything in predictor.iter_predict(sources, score_threshold=None, batch_size=args.batch_size,
                                             attention=args.attention, num_workers=args.num_workers,
                                             skipped=skipped, progress=sys.stderr.isatty()):
        name, image_id = name_of[everything.source]
        for iou_type, entries in coco_results(everything, image_id).items():
            results[iou_type] += entries
        pred = everything.above(args.threshold)
        images.append({"id": image_id, "file_name": Path(pred.source).name if not pred.source.startswith("<")
                       else f"{name}.png", "height": pred.size[0], "width": pred.size[1]})
        num_detections += len(pred.scores)
        if draw:
            visualize.save_figure(visualize.plot_prediction(pred), output_dir / f"{name}.png")
        if args.attention:
            fig = visualize.plot_attention(pred, max_predictions=args.max_attention)
            visualize.save_figure(fig, output_dir / f"{name}_attention.png")
        if pred.panoptic is not None:
            write_png(output_dir / "panoptic" / f"{name}.png", pred.panoptic["png_string"])
            panoptic_annotations.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": [
                {k: v for k, v in s.items() if k != "name"} for s in pred.panoptic["segments_info"]]})
    seconds = time.perf_counter() - start
    if not images:
        raise ImageError(f"none of the {len(sources)} images could be read: " + "; ".join(r for _, r in skipped))

    categories = _categories(predictor, results["bbox"], panoptic_annotations)
    write_json(output_dir / "results.json", results["bbox"])
    if predictor.masks:
        write_json(output_dir / "results_segm.json", results["segm"])
    write_json(output_dir / "images.json", {"images": images, "annotations": [], "categories": categories})
    if panoptic:
        write_json(output_dir / "panoptic.json", {"images": images, "annotations": panoptic_annotations,
                                                  "categories": categories})
    logger.info("%d images in %.1fs (%.2f images/s): %d detections above %.2f; results in %s", len(images), seconds,
                len(images) / seconds, num_detections, args.threshold, output_dir)
    if skipped:
        logger.warning("%d images skipped (unreadable): %s", len(skipped), "; ".join(r for _, r in skipped))
    return {"images": len(images), "skipped": skipped, "detections": num_detections, "seconds": seconds}


def _categories(predictor: Predictor, results: list, panoptic_annotations: list) -> List[dict]:
    """COCO 'categories': the named ones, or every id that appears when names are unknown."""
    things = set(predictor.thing_ids or [])
    if predictor.category_names is not None:
        items = sorted(predictor.category_names.items())
    else:
        ids = {r["category_id"] for r in results}
        ids |= {s["category_id"] for a in panoptic_annotations for s in a["segments_info"]}
        items = [(i, str(i)) for i in sorted(ids)]
    cats = [{"id": i, "name": n} for i, n in items]
    if predictor.thing_ids is not None:
        for c in cats:
            c["isthing"] = int(c["id"] in things)
    return cats


def main(argv: Optional[List[str]] = None) -> dict:
    from util.logger import setup_logging

    setup_logging()
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except (FileExistsError, FileNotFoundError, ValueError) as err:  # bad input: the message says it all
        logger.error("%s", err)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
