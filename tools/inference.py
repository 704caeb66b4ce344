"""Run a trained DETR on images from Python: the Predictor and predict() (the command is tools/predict.py).

With a checkpoint, a hub model or any DETR you built:

    from tools.inference import Predictor, predict
    predictor = Predictor.from_checkpoint("runs/synthetic/checkpoint.pth")   # or Predictor.from_hub("detr_resnet50")
    for p in predictor(["a.jpg", "photos/", pil_image, uint8_tensor], score_threshold=0.7):
        print(p.source, p.names, p.scores, p.boxes)   # boxes [N, 4] (x0, y0, x1, y1) in the image's pixels
    predictions = predict(model, images, category_names="coco")   # a bare model: say what its classes are

Images are read as the evaluation reads them (``tools.images``) and resized as evaluation does (short side
``val_size``, long side at most ``max_size``: the checkpoint's values, 800 / 1333 for the published models).
Unreadable files are skipped, named, and the rest goes on.
"""
import argparse
import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from torch import Tensor, nn

from datasets.coco_categories import COCO_CATEGORY_NAMES, COCO_PANOPTIC_CATEGORY_NAMES, COCO_PANOPTIC_THING_IDS
from datasets.transforms import make_coco_transforms
from models.detr import PostProcess
from models.segmentation import DETRsegm, PostProcessPanoptic, PostProcessSegm, rgb2id
from models.transformer import capture_attention
from tools.images import ImageInput, ImageList, describe, expand_inputs
from util.amp import AMP_DTYPES, autocast
from util.nested_tensor import nested_tensor_from_tensor_list

logger = logging.getLogger(__name__)

AMP_CHOICES = ("off", *AMP_DTYPES)
CategoryNames = Union[None, str, Dict[int, str]]


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
        if amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {list(AMP_CHOICES)}, got {amp!r}")
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
        loader = torch.utils.data.DataLoader(ImageList(sources, self.transform), batch_size=batch_size,
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
            with autocast(self.device, self.amp):
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


def add_model_arguments(parser: argparse.ArgumentParser, action: str) -> None:
    """The model of a command, one of them required: ``--resume`` (for ``Predictor.from_checkpoint``) or ``--hub``
    (for ``Predictor.from_hub``); ``action`` says what the command does with it ('run', 'export')."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--resume", help=f"checkpoint to {action} (path or URL; this repository's or the original's)")
    model.add_argument("--hub", help="published model by hub name (detr_resnet50, detr_resnet50_panoptic, ...), "
                                     "from the torch hub cache or downloaded")


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
