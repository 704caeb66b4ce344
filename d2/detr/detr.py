"""``Detr``: DETR as a Detectron2 meta-architecture, built from this repository's ``models/``.

Detectron2 provides the ResNet (``MODEL.RESNETS``, ``MODEL.BACKBONE``), batching, datasets and evaluation; the
transformer, the prediction heads, the matcher, the set criterion, the mask head and the panoptic post-processing
are ``models/``'s own classes, so the two code paths compute the same thing: given the same weights (see
``d2/converter.py``) and the same image, the outputs are equal to ``main.py``'s.
"""
import io
import logging

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import BitMasks, Boxes, ImageList, Instances, PolygonMasks
from detectron2.utils.events import get_event_storage
from PIL import Image
from torch import Tensor, nn

from models.backbone import Joiner
from models.detr import DETR, SetCriterion
from models.loader import load_weights
from models.matcher import HungarianMatcher
from models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from models.segmentation import DETRsegm, PostProcessPanoptic, PostProcessSegm
from models.transformer import Transformer
from util.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from util.checkpoint import load_checkpoint
from util.nested_tensor import NestedTensor
from util.panoptic import rgb2id

__all__ = ["Detr", "MaskedBackbone", "load_frozen_weights"]

logger = logging.getLogger(__name__)


class MaskedBackbone(nn.Module):
    """Detectron2's backbone (``build_backbone(cfg)``) on a NestedTensor: returns its ``OUT_FEATURES`` in order,
    each with the padding mask downsampled to the feature size the way ``models.backbone.Backbone`` does it."""

    def __init__(self, cfg: CfgNode):
        super().__init__()
        self.backbone = build_backbone(cfg)
        if cfg.MODEL.RESNETS.RES5_DILATION == 2:
            # DC5 as torchvision's replace_stride_with_dilation, which DETR uses: the first res5 block keeps dilation 1
            # in its 3x3 convolution (Detectron2 dilates every block), so converted DC5 checkpoints give DETR's outputs
            first = self.backbone.res5[0].conv2
            first.dilation, first.padding = (1, 1), (1, 1)
        shapes = self.backbone.output_shape()
        self.out_features = list(cfg.MODEL.RESNETS.OUT_FEATURES) if cfg.MODEL.RESNETS.OUT_FEATURES else list(shapes)
        self.num_channels = shapes[self.out_features[-1]].channels

    def forward(self, tensor_list: NestedTensor) -> dict[str, NestedTensor]:
        features = self.backbone(tensor_list.tensors)
        out = {}
        for name in self.out_features:
            x = features[name]
            mask = F.interpolate(tensor_list.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]  # [B, h, w]
            out[name] = NestedTensor(x, mask)
        return out


def _position_embedding(cfg: CfgNode) -> nn.Module:
    n_steps = cfg.MODEL.DETR.HIDDEN_DIM // 2
    kind = cfg.MODEL.DETR.POSITION_EMBEDDING
    if kind == "sine":
        return PositionEmbeddingSine(n_steps, normalize=True)
    if kind == "learned":
        return PositionEmbeddingLearned(n_steps)
    raise ValueError(f"MODEL.DETR.POSITION_EMBEDDING: expected 'sine' or 'learned', got {kind!r}")


def _is_thing_map(cfg: CfgNode) -> dict[int, bool]:
    """{contiguous class id: is a thing} from the metadata of the first training (else test) dataset."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if not names:
        raise ValueError("MODEL.DETR.PANOPTIC_ON needs a dataset (DATASETS.TRAIN or TEST) whose metadata has "
                         "thing_dataset_id_to_contiguous_id and stuff_dataset_id_to_contiguous_id")
    meta = MetadataCatalog.get(names[0])
    things = meta.get("thing_dataset_id_to_contiguous_id")
    stuff = meta.get("stuff_dataset_id_to_contiguous_id")
    if things is None or stuff is None:
        raise ValueError(f"MODEL.DETR.PANOPTIC_ON: the metadata of dataset {names[0]!r} lacks "
                         f"thing_dataset_id_to_contiguous_id / stuff_dataset_id_to_contiguous_id (register it with "
                         f"detectron2.data.datasets.register_coco_panoptic)")
    is_thing = {i: False for i in stuff.values()}
    is_thing.update({i: True for i in things.values()})
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    if sorted(is_thing) != list(range(num_classes)):
        raise ValueError(f"MODEL.DETR.NUM_CLASSES is {num_classes} but dataset {names[0]!r} numbers its classes "
                         f"{min(is_thing)}..{max(is_thing)} ({len(is_thing)} classes)")
    return is_thing


@META_ARCH_REGISTRY.register()
class Detr(nn.Module):
    """DETR for Detectron2: ``MODEL.META_ARCHITECTURE: "Detr"``.

    Training returns the weighted losses (Detectron2 sums them); the class error and cardinality error go to the
    event storage. Inference returns per image ``{'instances': Instances}`` with ``pred_boxes`` (every query, at the
    requested output size ``height`` x ``width``, not clipped, as main.py evaluates them), ``scores``,
    ``pred_classes`` (contiguous ids, no-object excluded from the argmax), plus ``pred_masks`` [Q, H, W] with
    ``MODEL.MASK_ON``, and ``'panoptic_seg'`` (id map [H, W], segments_info) with ``MODEL.DETR.PANOPTIC_ON``.
    """

    def __init__(self, cfg: CfgNode):
        super().__init__()
        c = cfg.MODEL.DETR
        self.num_classes = c.NUM_CLASSES
        self.mask_on = cfg.MODEL.MASK_ON
        self.panoptic_on = c.PANOPTIC_ON
        if self.panoptic_on and not self.mask_on:
            raise ValueError("MODEL.DETR.PANOPTIC_ON needs MODEL.MASK_ON (the panoptic image is made of the masks)")
        if self.mask_on and len(cfg.MODEL.RESNETS.OUT_FEATURES) != 4:
            raise ValueError(f"MODEL.MASK_ON: the mask head needs MODEL.RESNETS.OUT_FEATURES res2..res5, got "
                             f"{list(cfg.MODEL.RESNETS.OUT_FEATURES)}")

        masked_backbone = MaskedBackbone(cfg)
        backbone = Joiner(masked_backbone, _position_embedding(cfg))
        backbone.num_channels = masked_backbone.num_channels
        transformer = Transformer(d_model=c.HIDDEN_DIM, nhead=c.NHEADS, num_encoder_layers=c.ENC_LAYERS,
                                  num_decoder_layers=c.DEC_LAYERS, dim_feedforward=c.DIM_FEEDFORWARD,
                                  dropout=c.DROPOUT, normalize_before=c.PRE_NORM, return_intermediate_dec=True)
        detr = DETR(backbone, transformer, num_classes=self.num_classes, num_queries=c.NUM_OBJECT_QUERIES,
                    aux_loss=c.DEEP_SUPERVISION)
        if self.mask_on:
            # the box model is frozen when trained weights are given; train_net.py loads them (load_frozen_weights)
            detr = DETRsegm(detr, freeze_detr=bool(c.FROZEN_WEIGHTS))
        self.detr = detr

        matcher = HungarianMatcher(cost_class=c.COST_CLASS, cost_bbox=c.COST_BBOX, cost_giou=c.COST_GIOU)
        weight_dict = {"loss_ce": 1.0, "loss_bbox": c.L1_WEIGHT, "loss_giou": c.GIOU_WEIGHT}
        losses = ["labels", "boxes", "cardinality"]
        if self.mask_on:
            weight_dict.update({"loss_mask": c.MASK_WEIGHT, "loss_dice": c.DICE_WEIGHT})
            losses.append("masks")
        if c.DEEP_SUPERVISION:
            weight_dict.update({f"{k}_{i}": v for i in range(c.DEC_LAYERS - 1) for k, v in list(weight_dict.items())})
        self.criterion = SetCriterion(self.num_classes, matcher=matcher, weight_dict=weight_dict,
                                      eos_coef=c.NO_OBJECT_WEIGHT, losses=losses)
        # the class weights come from the config (NO_OBJECT_WEIGHT), not from checkpoints, which hold the model only
        empty_weight = self.criterion.empty_weight
        del self.criterion.empty_weight
        self.criterion.register_buffer("empty_weight", empty_weight, persistent=False)
        self.postprocess_segm = PostProcessSegm() if self.mask_on else None
        self.postprocess_panoptic = (PostProcessPanoptic(_is_thing_map(cfg), threshold=c.PANOPTIC_THRESHOLD)
                                     if self.panoptic_on else None)

        # Detectron2 feeds 0..255 pixels; (x - mean) / std with the configured values (torchvision's ImageNet
        # statistics times 255 in the shipped configs) is main.py's ToTensor + Normalize
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), persistent=False)
        self.to(torch.device(cfg.MODEL.DEVICE))

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: list[dict]) -> tuple[ImageList, NestedTensor]:
        """Normalise, pad (zeros at the bottom and right) and batch; the NestedTensor's mask is True on padding."""
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        image_list = ImageList.from_tensors(images)
        b, _, h, w = image_list.tensor.shape
        mask = torch.ones((b, h, w), dtype=torch.bool, device=self.device)
        for m, (ih, iw) in zip(mask, image_list.image_sizes):
            m[:ih, :iw] = False
        return image_list, NestedTensor(image_list.tensor, mask)

    def forward(self, batched_inputs: list[dict]):
        images, samples = self.preprocess_image(batched_inputs)
        outputs = self.detr(samples)
        if self.training:
            targets = self.prepare_targets([x["instances"].to(self.device) for x in batched_inputs])
            loss_dict = self.criterion(outputs, targets)
            weights = self.criterion.weight_dict
            storage = get_event_storage()
            for name in ("class_error", "cardinality_error"):
                if name in loss_dict:
                    storage.put_scalar(name, float(loss_dict[name]))
            return {k: v * weights[k] for k, v in loss_dict.items() if k in weights}
        return self.inference(outputs, batched_inputs, images.image_sizes)

    def prepare_targets(self, gt_instances: list[Instances]) -> list[dict]:
        """Instances (xyxy pixel boxes) -> SetCriterion targets ((cx, cy, w, h) normalised by the image size)."""
        targets = []
        for inst in gt_instances:
            h, w = inst.image_size
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            target = {"labels": inst.gt_classes, "boxes": box_xyxy_to_cxcywh(inst.gt_boxes.tensor / scale)}
            if self.mask_on:
                masks = inst.gt_masks
                if isinstance(masks, PolygonMasks):
                    masks = BitMasks.from_polygon_masks(masks, h, w)
                target["masks"] = masks.tensor.to(self.device)
            targets.append(target)
        return targets

    @torch.no_grad()
    def inference(self, outputs: dict, batched_inputs: list[dict], image_sizes: list[tuple[int, int]]) -> list[dict]:
        # as models.detr.PostProcess: softmax over all classes, best non-no-object class per query
        scores, labels = F.softmax(outputs["pred_logits"], -1)[..., :-1].max(-1)
        out_sizes = [(x.get("height", s[0]), x.get("width", s[1])) for x, s in zip(batched_inputs, image_sizes)]
        masks = None
        if self.mask_on:
            raw = [{} for _ in out_sizes]
            masks = self.postprocess_segm(raw, outputs, torch.as_tensor(out_sizes, device=self.device),
                                          torch.as_tensor(image_sizes, device=self.device))
        results = []
        for i, (h, w) in enumerate(out_sizes):
            inst = Instances((h, w))
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            inst.pred_boxes = Boxes(box_cxcywh_to_xyxy(outputs["pred_boxes"][i]) * scale)
            inst.scores = scores[i]
            inst.pred_classes = labels[i]
            if masks is not None:
                inst.pred_masks = masks[i]["masks"][:, 0].bool()
            results.append({"instances": inst})
        if self.panoptic_on:
            panoptic = self.postprocess_panoptic(outputs, [tuple(s) for s in image_sizes], out_sizes)
            for result, pred in zip(results, panoptic):
                result["panoptic_seg"] = _decode_panoptic(pred)
        return results


def _decode_panoptic(pred: dict) -> tuple[Tensor, list[dict]]:
    """PostProcessPanoptic's PNG (COCO panoptic format, id = R + 256 G + 256^2 B) -> Detectron2's
    (id map [H, W] int32, segments_info with contiguous category ids)."""
    ids = rgb2id(np.asarray(Image.open(io.BytesIO(pred["png_string"])).convert("RGB")))
    return torch.from_numpy(ids.astype(np.int32)), [dict(s) for s in pred["segments_info"]]


def load_frozen_weights(model: Detr, path: str) -> None:
    """``MODEL.DETR.FROZEN_WEIGHTS``: a trained box model (converted or trained here, keys ``detr.*``) under the
    mask head, loaded strictly into ``model.detr.detr``."""
    state = load_checkpoint(path)["model"]
    prefix = "detr."
    box_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    others = [k for k in state if not k.startswith(prefix)]
    if others:
        raise ValueError(f"MODEL.DETR.FROZEN_WEIGHTS {path}: expected a Detectron2 DETR box checkpoint (keys "
                         f"'detr.*', see d2/converter.py); found {others[:5]}")
    load_weights(model.detr.detr, {"model": box_state}, path)
    logger.info("Loaded the frozen box model from %s", path)
