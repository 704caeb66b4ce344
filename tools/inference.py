"""Run a trained DETR on images from Python: the Predictor and predict() (the command is tools/predict.py).

With a checkpoint, a hub model or any DETR you built:

    from tools.inference import Predictor, predict
    predictor = Predictor.from_checkpoint("runs/synthetic/checkpoint.pth")   # or Predictor.from_hub("detr_resnet50")
    for p in predictor(["a.jpg", "photos/", pil_image, uint8_tensor], score_threshold=0.7):
        print(p.source, p.names, p.scores, p.boxes)   # boxes [N, 4] (x0, y0, x1, y1) in the image's pixels
    predictions = predict(model, images, category_names="coco")   # a bare model: say what its classes are

The model comes from ``models.loader.load_model`` (a checkpoint path, a URL in the torch hub cache, or a hub name),
as main.py and hubconf.py load theirs; ``Predictor.from_loaded`` takes one already loaded.
Images are read as the evaluation reads them (``tools.images``) and resized as evaluation does (short side
``val_size``, long side at most ``max_size``: the checkpoint's values, 800 / 1333 for the published models).
Unreadable files are skipped, named, and the rest goes on.
"""
import argparse
import contextlib
import logging
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from datasets.transforms import make_coco_transforms
from models.detr import PostProcess
from models.loader import PUBLISHED, LoadedModel, load_model
from models.segmentation import DETRsegm, PostProcessPanoptic, PostProcessSegm
from models.transformer import capture_attention
from tools.categories import CategoryNames, loaded_category_names, resolve_categories
from tools.categories import resolve_category_names  # noqa: F401  (tools.inference.resolve_category_names)
from tools.images import ImageInput, ImageList, describe, expand_inputs
from tools.prediction import Prediction, decode_panoptic, image_attention
from util.amp import AMP_DTYPES, autocast
from util.nested_tensor import nested_tensor_from_tensor_list

logger = logging.getLogger(__name__)

AMP_CHOICES = ("off", *AMP_DTYPES)


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
        self.category_names, file_thing_ids = resolve_categories(category_names)
        if thing_ids is None:
            thing_ids = file_thing_ids
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
        """The model of a checkpoint (a path, a URL in the torch hub cache, or a hub name), built and loaded by
        ``models.loader.load_model`` as main.py builds it (see ``from_loaded`` for the names and sizes)."""
        return cls.from_loaded(load_model(checkpoint, device=device), category_names=category_names, **kwargs)

    @classmethod
    def from_hub(cls, name: str, pretrained: bool = True, device: Union[str, torch.device, None] = None,
                 **kwargs) -> "Predictor":
        """A ``hubconf`` model (``detr_resnet50``, ``detr_resnet50_panoptic``, ...) with COCO's category names.
        ``pretrained`` loads the published weights through the torch hub cache (downloaded when absent)."""
        if name not in PUBLISHED:
            raise ValueError(f"unknown hub model {name!r}; expected one of {', '.join(sorted(PUBLISHED))}")
        return cls.from_loaded(load_model(name, device=device, pretrained=pretrained), **kwargs)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, category_names: CategoryNames = None, **kwargs) -> "Predictor":
        """A ``models.loader.load_model`` model. Category names: ``category_names`` if given, else the checkpoint's,
        else COCO's for the published models, else the ids (said once). Thing ids: ``thing_ids`` if given, else the
        checkpoint's (or its dataset's). ``val_size`` / ``max_size`` default to the checkpoint's."""
        if category_names is None:
            category_names = loaded_category_names(loaded)
        if kwargs.get("thing_ids") is None:
            kwargs["thing_ids"] = loaded.thing_ids
        for key in ("val_size", "max_size", "device"):
            if kwargs.get(key) is None:
                kwargs[key] = loaded.args[key]
        return cls(loaded.model, category_names=category_names, **kwargs)

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
                pred.panoptic = decode_panoptic(panoptic[i], self.names_of)
            if attention:
                pred.attention = image_attention(recorded, feature_mask[0], i)
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


def _progress(total: int, enabled: bool):
    if not enabled or total < 2:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", dynamic_ncols=True)
