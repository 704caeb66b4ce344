"""The DETR detector, its set-prediction loss and its post-processing."""
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbone import build_backbone
from models.matcher import build_matcher
from models.segmentation import DETRsegm, PostProcessPanoptic, PostProcessSegm, dice_loss, sigmoid_focal_loss
from models.spatial_prior import SpatialPrior
from models.transformer import build_transformer
from util.args import KNOWN_NUM_CLASSES, KNOWN_THING_IDS
from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from util.dist import get_world_size, is_dist_avail_and_initialized
from util.metrics import accuracy
from util.nested_tensor import NestedTensor, nested_tensor_from_tensor_list


class DETR(nn.Module):
    """Backbone + transformer + prediction heads for set-based object detection.

    ``num_classes`` counts the object classes, *without* the no-object class the class head adds.
    Two optional convergence aids for training from scratch, not in the published DETR: ``spatial_prior``
    (``models.spatial_prior.SpatialPrior``), and ``query_groups`` > 1 (Group DETR, Chen et al. 2022): in training
    the decoder also runs ``query_groups - 1`` extra copies of the queries (their own embeddings, attending only
    within their group), each matched to the targets on its own ('group_outputs'); inference uses the first group.
    """

    def __init__(self, backbone: nn.Module, transformer: nn.Module, num_classes: int, num_queries: int,
                 aux_loss: bool = False, spatial_prior: Optional[SpatialPrior] = None, query_groups: int = 1):
        super().__init__()
        self.num_queries = num_queries
        self.query_groups = query_groups
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries * query_groups, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.spatial_prior = spatial_prior
        if spatial_prior is not None:
            # its parameters keep the state-dict keys they had before they moved into their own module
            self.register_state_dict_post_hook(_lift_spatial_prior_keys)
            self.register_load_state_dict_pre_hook(_nest_spatial_prior_keys)

    def forward(self, samples: NestedTensor) -> Dict[str, Any]:
        """``samples``: a NestedTensor (images [B, 3, H, W] + padding mask [B, H, W]), a [B, 3, H, W] tensor or a
        list of [3, H, W] tensors.

        Returns a dict with
        - 'pred_logits': [B, num_queries, num_classes + 1] classification logits (last = no object);
        - 'pred_boxes': [B, num_queries, 4] (cx, cy, w, h) normalised by the (unpadded) image size;
        - 'aux_outputs' (with aux_loss): a list with the same two keys for every decoder layer but the last;
        - 'group_outputs' (training with query_groups > 1): the same dict for each extra query group.
        """
        if isinstance(samples, (list, Tensor)):
            samples = nested_tensor_from_tensor_list(samples)
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        assert mask is not None
        groups = self.query_groups if self.training else 1
        queries = self.query_weights(groups)
        bias = self.cross_attention_bias(mask)
        query_mask: Optional[Tensor] = None
        if groups > 1:
            if bias is not None:
                bias = bias.repeat(1, groups, 1)
            group = torch.arange(self.num_queries * groups, device=mask.device) // self.num_queries
            query_mask = group[:, None] != group[None, :]  # queries attend within their own group only
        hs = self.transformer(self.input_proj(src), mask, queries, pos[-1], bias,
                              query_mask)[0]  # [num_dec_layers, B, Q * groups, C]
        out = self.predict(hs[:, :, : self.num_queries])
        if groups > 1:
            q = self.num_queries
            out["group_outputs"] = [self.predict(hs[:, :, g * q: (g + 1) * q]) for g in range(1, groups)]
        return out

    def query_weights(self, groups: int) -> Tensor:
        """The embeddings of the first ``groups`` query groups. The whole weight when that is all of it: a slice of
        a parameter taken under no_grad still requires grad without a grad_fn, which trips autograd-hook users
        such as FlopCounterMode."""
        n = self.num_queries * groups
        if n == self.query_embed.weight.shape[0]:
            return self.query_embed.weight
        return self.query_embed.weight[:n]

    def cross_attention_bias(self, mask: Tensor) -> Optional[Tensor]:
        """The spatial prior's [B, Q, H*W] decoder cross-attention bias; None for the published model."""
        if self.spatial_prior is None:
            return None
        return self.spatial_prior.attention_bias(mask)

    def predict(self, hs: Tensor) -> Dict[str, Any]:
        """Class and box heads on the decoder outputs hs [num_dec_layers, B, Q, C] (the output dict of forward)."""
        outputs_class = self.class_embed(hs)
        box = self.bbox_embed(hs)
        if self.spatial_prior is not None:
            box = self.spatial_prior.offset_centres(box)
        outputs_coord = box.sigmoid()
        out: Dict[str, Any] = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(outputs_class, outputs_coord)
        return out

    def _set_aux_loss(self, outputs_class: Tensor, outputs_coord: Tensor) -> List[Dict[str, Tensor]]:
        return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]


_PRIOR_KEYS = ("reference_points", "prior_log_sigma")


def _lift_spatial_prior_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for name in _PRIOR_KEYS:
        key = f"{prefix}spatial_prior.{name}"
        if key in state_dict:
            state_dict[prefix + name] = state_dict.pop(key)


def _nest_spatial_prior_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for name in _PRIOR_KEYS:
        if prefix + name in state_dict:
            state_dict[f"{prefix}spatial_prior.{name}"] = state_dict.pop(prefix + name)


class SetCriterion(nn.Module):
    """DETR's set loss: Hungarian-match predictions to targets, then supervise each matched pair
    (class + box) and push every unmatched prediction to the no-object class.

    Box and mask losses are normalised by the number of target boxes in the batch, averaged across
    processes; the class loss is a weighted mean with the no-object class weighted by ``eos_coef``.
    For gradient accumulation, ``forward``'s ``batch_targets`` normalises a micro-batch's losses as those of the
    whole batch it belongs to, so that the micro-batches' losses (and gradients) sum to the whole batch's.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: dict, eos_coef: float, losses: list[str]):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = losses
        empty_weight = torch.ones(self.num_classes + 1)
        empty_weight[-1] = self.eos_coef  # no-object is the most frequent "class": down-weight it
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True, class_weight_sum: Optional[float] = None):
        """Cross-entropy over num_classes + 1 for every query; targets of unmatched queries are no-object.

        A mean over the batch's queries weighted by the class weights (``empty_weight``): divided by the sum of the
        weights of all queries' target classes, that of these queries unless ``class_weight_sum`` gives that of a
        larger batch (gradient accumulation, see ``class_weight_sum``)."""
        src_logits = outputs["pred_logits"]
        idx = self._get_src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o
        if class_weight_sum is None:
            loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)
        else:
            loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight,
                                      reduction="sum") / class_weight_sum
        losses = {"loss_ce": loss_ce}
        if log:
            # logged only, not a loss
            losses["class_error"] = 100 - accuracy(src_logits[idx], target_classes_o)[0]
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes):
        """L1 error between the number of non-no-object predictions and of targets (logged only, no gradient)."""
        pred_logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor([len(v["labels"]) for v in targets], device=pred_logits.device)
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """L1 and 1 - GIoU of the matched boxes ((cx, cy, w, h) normalised), summed and divided by num_boxes."""
        idx = self._get_src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][i] for t, (_, i) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = 1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes),
                                                       box_cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def loss_masks(self, outputs, targets, indices, num_boxes):
        """Focal + dice loss of the matched masks, predictions upsampled to the padded target size."""
        src_idx = self._get_src_permutation_idx(indices)
        tgt_idx = self._get_tgt_permutation_idx(indices)
        src_masks = outputs["pred_masks"][src_idx]  # [n, h, w]
        target_masks, _ = nested_tensor_from_tensor_list([t["masks"] for t in targets]).decompose()
        target_masks = target_masks.to(src_masks)[tgt_idx]  # [n, H, W]
        src_masks = F.interpolate(src_masks[:, None], size=target_masks.shape[-2:], mode="bilinear",
                                  align_corners=False)
        src_masks = src_masks[:, 0].flatten(1)
        target_masks = target_masks.flatten(1).view(src_masks.shape)
        return {"loss_mask": sigmoid_focal_loss(src_masks, target_masks, num_boxes),
                "loss_dice": dice_loss(src_masks, target_masks, num_boxes)}

    @staticmethod
    def _get_src_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        return batch_idx, src_idx

    @staticmethod
    def _get_tgt_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
        tgt_idx = torch.cat([tgt for (_, tgt) in indices])
        return batch_idx, tgt_idx

    def get_loss(self, loss, outputs, targets, indices, num_boxes, **kwargs):
        loss_map = {
            "labels": self.loss_labels,
            "cardinality": self.loss_cardinality,
            "boxes": self.loss_boxes,
            "masks": self.loss_masks,
        }
        if loss not in loss_map:
            raise ValueError(f"SetCriterion: unknown loss {loss!r}; expected one of {sorted(loss_map)}")
        return loss_map[loss](outputs, targets, indices, num_boxes, **kwargs)

    def forward(self, outputs: dict, targets: list[dict],
                batch_targets: Optional[list[dict]] = None) -> dict[str, Tensor]:
        """outputs: the model's output dict; targets: one dict per image with 'labels' [n] and 'boxes' [n, 4]
        ((cx, cy, w, h) normalised), plus 'masks' [n, H, W] for the mask losses.
        Returns the unweighted losses; aux-layer losses get the suffix ``_{i}``.

        ``batch_targets`` (gradient accumulation): the targets of the whole batch of which ``targets`` is one
        micro-batch (this process's part; ``targets`` among them). The losses are then this micro-batch's share of
        the whole batch's: box and mask losses divided by the whole batch's box count (averaged across processes,
        as always), the class loss by the whole batch's sum of class weights (``class_weight_sum``, this process's
        as always), so the shares of all micro-batches add up to the whole batch's losses. Logged-only values
        (class_error, cardinality_error) stay this micro-batch's. Matching is per image, so it is unaffected."""
        if "group_outputs" in outputs:
            # query groups (a convergence aid): each group is matched and supervised on its own; losses averaged
            groups = [{k: v for k, v in outputs.items() if k != "group_outputs"}] + outputs["group_outputs"]
            per_group = [self(group, targets, batch_targets) for group in groups]
            return {k: sum(losses[k] for losses in per_group) / len(per_group) for k in per_group[0]}
        self._check_targets(targets)
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        aux_outputs = outputs.get("aux_outputs", [])
        # every decoder layer is matched on its own; a matcher that can, matches them all at once
        if hasattr(self.matcher, "match_layers"):
            indices_per_layer = self.matcher.match_layers([outputs_without_aux] + aux_outputs, targets)
        else:
            indices_per_layer = [self.matcher(o, targets) for o in [outputs_without_aux] + aux_outputs]

        # average number of target boxes across processes, for normalisation
        num_boxes = sum(len(t["labels"]) for t in (targets if batch_targets is None else batch_targets))
        num_boxes = torch.as_tensor([num_boxes], dtype=torch.float, device=next(iter(outputs.values())).device)
        if is_dist_avail_and_initialized():
            torch.distributed.all_reduce(num_boxes)
        num_boxes = torch.clamp(num_boxes / get_world_size(), min=1).item()
        # the class loss's normaliser: the same for every decoder layer (every layer has as many queries)
        labels_kwargs = {}
        if batch_targets is not None:
            labels_kwargs["class_weight_sum"] = self.class_weight_sum(batch_targets, outputs["pred_logits"].shape[1])

        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices_per_layer[0], num_boxes,
                                        **(labels_kwargs if loss == "labels" else {})))

        for i, (aux, indices) in enumerate(zip(aux_outputs, indices_per_layer[1:])):
            for loss in self.losses:
                if loss == "masks":
                    continue  # intermediate masks are too costly and not predicted
                kwargs = {"log": False, **labels_kwargs} if loss == "labels" else {}
                l_dict = self.get_loss(loss, aux, targets, indices, num_boxes, **kwargs)
                losses.update({k + f"_{i}": v for k, v in l_dict.items()})
        return losses

    def class_weight_sum(self, targets: list[dict], num_queries: int) -> float:
        """The normaliser of the class loss (``loss_labels``) over the images of ``targets``, known before matching:
        the sum over all queries of the weight of their target class. The matching is one-to-one, so an image with
        n objects has min(n, num_queries) matched queries, whose object classes weigh 1, and the rest no-object,
        weighing ``eos_coef`` (``empty_weight``)."""
        eos = float(self.empty_weight[-1])
        matched = sum(min(len(t["labels"]), num_queries) for t in targets)
        return matched + eos * (len(targets) * num_queries - matched)

    def _check_targets(self, targets: list[dict]) -> None:
        for i, t in enumerate(targets):
            where = f"target {i}" + (f" (image_id {int(t['image_id'])})" if "image_id" in t else "")
            labels, boxes = t["labels"], t["boxes"]
            if len(labels) != len(boxes):
                raise ValueError(f"SetCriterion: {where} has {len(labels)} labels but {len(boxes)} boxes")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
                raise ValueError(
                    f"SetCriterion: {where} has class id {bad}, outside [0, {self.num_classes}) for "
                    f"num_classes={self.num_classes}; set --num_classes to at least max class id + 1")
            if boxes.numel() and not bool((boxes[:, 2:] > 0).all()):
                k = int((boxes[:, 2:] <= 0).any(dim=1).nonzero()[0])
                raise ValueError(
                    f"SetCriterion: {where} box {k} has non-positive width/height: {boxes[k].tolist()} "
                    f"(expected (cx, cy, w, h) normalised with w > 0 and h > 0)")


class PostProcess(nn.Module):
    """Converts the model's output into the format the COCO api expects."""

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict]:
        """target_sizes: [B, 2] (h, w) of each image (the original size for evaluation, the augmented size
        for visualisation). Returns per image 'scores' [Q], 'labels' [Q] and 'boxes' [Q, 4] (x0, y0, x1, y1)
        in pixels; the no-object class is excluded from the argmax."""
        out_logits, out_bbox = outputs["pred_logits"], outputs["pred_boxes"]
        if len(out_logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError(f"PostProcess: expected target_sizes [{len(out_logits)}, 2], got "
                             f"{list(target_sizes.shape)}")
        prob = F.softmax(out_logits, -1)
        scores, labels = prob[..., :-1].max(-1)
        boxes = box_cxcywh_to_xyxy(out_bbox)
        img_h, img_w = target_sizes.unbind(1)
        scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        boxes = boxes * scale_fct[:, None, :]
        return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]


class MLP(nn.Module):
    """A plain multi-layer perceptron (ReLU between layers), used as the box head."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def build_weight_dict(args) -> dict[str, float]:
    weight_dict = {"loss_ce": 1, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if args.masks:
        weight_dict["loss_mask"] = args.mask_loss_coef
        weight_dict["loss_dice"] = args.dice_loss_coef
    if args.aux_loss:
        aux_weight_dict = {}
        for i in range(args.dec_layers - 1):
            aux_weight_dict.update({k + f"_{i}": v for k, v in weight_dict.items()})
        weight_dict.update(aux_weight_dict)
    return weight_dict


def build(args):
    """Returns (model, criterion, postprocessors) from the parsed command-line arguments.

    The dataset owns its class count: ``args.num_classes`` when set (main.py derives it from the dataset when the
    user did not give --num_classes), else the count of a dataset known without reading its files
    (``util.args.KNOWN_NUM_CLASSES``: 91 for coco, 250 for coco_panoptic, as the original). With ``--masks`` on a
    panoptic dataset, ``args.thing_ids`` lists the category ids that are things (the rest are stuff; default
    ``util.args.KNOWN_THING_IDS``), and ``args.category_names`` {id: name} the categories, also taken from the
    dataset; a 'panoptic' post-processor is built whenever the thing ids are known.
    """
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = KNOWN_NUM_CLASSES.get(args.dataset_file)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"build_model: num_classes must be a positive integer, got {num_classes!r} "
                         f"(set --num_classes, or let main.py take it from the dataset)")
    device = torch.device(args.device)

    backbone = build_backbone(args)
    transformer = build_transformer(args)
    spatial_prior = SpatialPrior(args.num_queries) if getattr(args, "spatial_prior", False) else None
    model = DETR(backbone, transformer, num_classes=num_classes, num_queries=args.num_queries,
                 aux_loss=args.aux_loss, spatial_prior=spatial_prior, query_groups=getattr(args, "query_groups", 1))
    if args.masks:
        model = DETRsegm(model, freeze_detr=(args.frozen_weights is not None))
    matcher = build_matcher(args)
    losses = ["labels", "boxes", "cardinality"] + (["masks"] if args.masks else [])
    criterion = SetCriterion(num_classes, matcher=matcher, weight_dict=build_weight_dict(args),
                             eos_coef=args.eos_coef, losses=losses)
    criterion.to(device)
    postprocessors = {"bbox": PostProcess()}
    if args.masks:
        postprocessors["segm"] = PostProcessSegm()
        thing_ids = getattr(args, "thing_ids", None)
        if thing_ids is None:
            thing_ids = KNOWN_THING_IDS.get(args.dataset_file)
        if thing_ids is not None:
            things = set(thing_ids)
            # the dataset's categories when known (a class that is none of them makes no panoptic segment)
            category_ids = getattr(args, "category_names", None) or range(num_classes + 1)
            is_thing_map = {int(i): int(i) in things for i in category_ids}
            postprocessors["panoptic"] = PostProcessPanoptic(
                is_thing_map, threshold=getattr(args, "panoptic_threshold", 0.85))
    return model, criterion, postprocessors
