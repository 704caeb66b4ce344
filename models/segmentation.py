"""Mask head for instance / panoptic segmentation, trained on top of a (usually frozen) box DETR."""
import io
from collections import defaultdict
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss as _tv_sigmoid_focal_loss

from util.nested_tensor import NestedTensor, nested_tensor_from_tensor_list
# id2rgb / rgb2id import panopticapi when first called (hub users without it can build every model); rgb2id is
# also importable from here, as before
from util.panoptic import id2rgb, import_panopticapi, rgb2id


class DETRsegm(nn.Module):
    """Wraps a DETR and adds 'pred_masks' [B, num_queries, H/4, W/4] (mask logits) to its outputs.

    The backbone must return intermediate layers (``--masks``). With ``freeze_detr`` only the mask head trains.
    """

    def __init__(self, detr: nn.Module, freeze_detr: bool = False):
        super().__init__()
        self.detr = detr
        self.freeze_detr = freeze_detr
        if freeze_detr:
            for p in self.parameters():
                p.requires_grad_(False)
        hidden_dim, nheads = detr.transformer.d_model, detr.transformer.nhead
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, nheads, dropout=0.0)
        # channels of layer3, layer2, layer1: [1024, 512, 256] for ResNet-50/101 as in the original. With a backbone
        # cut after layer3 (--backbone_last_layer layer3) the transformer's map is layer3 itself: the head then adds
        # layer3 at its own resolution, then layer2 and layer1, and the masks still come out at 1/4 resolution.
        c = detr.backbone.num_channels
        if _cut_after_layer3(detr.backbone):
            c *= 2
        self.mask_head = MaskHeadSmallConv(hidden_dim + nheads, [c // 2, c // 4, c // 8], hidden_dim)

    def train(self, mode: bool = True) -> "DETRsegm":
        super().train(mode)
        if self.freeze_detr:
            # a frozen box model keeps its batch-norm statistics too (only --backbone_norm bn has any; the
            # original's frozen batch norm has none, and its transformer keeps training-mode dropout, as here)
            for m in self.detr.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, samples: NestedTensor) -> Dict[str, Any]:
        """DETR's output dict plus 'pred_masks' [B, num_queries, H/4, W/4] (mask logits)."""
        if isinstance(samples, (list, Tensor)):
            samples = nested_tensor_from_tensor_list(samples)
        detr = self.detr
        features, pos = detr.backbone(samples)
        src, mask = features[-1].decompose()
        assert mask is not None
        bs = src.shape[0]
        src_proj = detr.input_proj(src)
        # one query group: the mask head is trained on the first (DETR's own) queries
        hs, memory = detr.transformer(src_proj, mask, detr.query_weights(1), pos[-1],
                                      detr.cross_attention_bias(mask))
        out = detr.predict(hs)

        bbox_mask = self.bbox_attention(hs[-1], memory, mask=mask)  # [B, Q, nheads, h, w]
        seg_masks = self.mask_head(src_proj, bbox_mask, [features[2].tensors, features[1].tensors,
                                                         features[0].tensors])
        out["pred_masks"] = seg_masks.view(bs, detr.num_queries, seg_masks.shape[-2], seg_masks.shape[-1])
        return out


def _cut_after_layer3(backbone: nn.Module) -> bool:
    """Whether a Joiner's ResNet body ends at layer3 (its return_layers name no layer4)."""
    body = backbone[0] if isinstance(backbone, nn.Sequential) and len(backbone) > 0 else backbone
    return_layers = getattr(body, "return_layers", None)
    return return_layers is not None and "layer3" in return_layers and "layer4" not in return_layers


def _expand(tensor: Tensor, length: int) -> Tensor:
    """[B, ...] -> [B * length, ...], each item repeated ``length`` times consecutively."""
    return tensor.unsqueeze(1).repeat(1, int(length), 1, 1, 1).flatten(0, 1)


class MaskHeadSmallConv(nn.Module):
    """FPN-like convolutional head: upsamples the per-query attention maps with the backbone's
    layer3/2/1 features to 1/4 resolution. Output: [B * num_queries, 1, H/4, W/4] mask logits."""

    def __init__(self, dim: int, fpn_dims: list[int], context_dim: int):
        super().__init__()
        inter_dims = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16,
                      context_dim // 64]
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = nn.GroupNorm(8, dim)
        self.lay2 = nn.Conv2d(dim, inter_dims[1], 3, padding=1)
        self.gn2 = nn.GroupNorm(8, inter_dims[1])
        self.lay3 = nn.Conv2d(inter_dims[1], inter_dims[2], 3, padding=1)
        self.gn3 = nn.GroupNorm(8, inter_dims[2])
        self.lay4 = nn.Conv2d(inter_dims[2], inter_dims[3], 3, padding=1)
        self.gn4 = nn.GroupNorm(8, inter_dims[3])
        self.lay5 = nn.Conv2d(inter_dims[3], inter_dims[4], 3, padding=1)
        self.gn5 = nn.GroupNorm(8, inter_dims[4])
        self.out_lay = nn.Conv2d(inter_dims[4], 1, 3, padding=1)
        self.dim = dim
        self.adapter1 = nn.Conv2d(fpn_dims[0], inter_dims[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], inter_dims[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], inter_dims[3], 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor, bbox_mask: Tensor, fpns: List[Tensor]) -> Tensor:
        """x: [B, C, h, w] projected features; bbox_mask: [B, Q, nheads, h, w]; fpns: layer3, layer2, layer1 maps."""
        x = torch.cat([_expand(x, bbox_mask.shape[1]), bbox_mask.flatten(0, 1)], 1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        x = F.relu(self.gn3(self.lay3(_add_fpn(x, self.adapter1(fpns[0])))))
        x = F.relu(self.gn4(self.lay4(_add_fpn(x, self.adapter2(fpns[1])))))
        x = F.relu(self.gn5(self.lay5(_add_fpn(x, self.adapter3(fpns[2])))))
        return self.out_lay(x)


def _add_fpn(x: Tensor, fpn: Tensor) -> Tensor:
    """x [B * Q, C, h, w] upsampled (nearest) to the backbone map fpn [B, C, H, W] (repeated per query) and added."""
    if fpn.size(0) != x.size(0):
        fpn = _expand(fpn, x.size(0) // fpn.size(0))
    return fpn + F.interpolate(x, size=fpn.shape[-2:], mode="nearest")


class MHAttentionMap(nn.Module):
    """Multi-head attention weights (softmax over all pixels) of each query over the encoder memory.
    Output: [B, Q, num_heads, h, w]."""

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim, bias=bias)
        self.k_linear = nn.Linear(query_dim, hidden_dim, bias=bias)
        nn.init.zeros_(self.k_linear.bias)
        nn.init.zeros_(self.q_linear.bias)
        nn.init.xavier_uniform_(self.k_linear.weight)
        nn.init.xavier_uniform_(self.q_linear.weight)
        self.normalize_fact = float(hidden_dim / self.num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """q: [B, Q, C] queries; k: [B, C, h, w] memory; mask: [B, h, w] True on padding."""
        q = self.q_linear(q)
        # the key projection as a 1x1 convolution keeps the spatial layout
        k = F.conv2d(k, self.k_linear.weight.unsqueeze(-1).unsqueeze(-1), self.k_linear.bias)
        head_dim = self.hidden_dim // self.num_heads
        qh = q.view(q.shape[0], q.shape[1], self.num_heads, head_dim)
        kh = k.view(k.shape[0], self.num_heads, head_dim, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        if mask is not None:
            weights.masked_fill_(mask.unsqueeze(1).unsqueeze(1), float("-inf"))
        weights = F.softmax(weights.flatten(2), dim=-1).view(weights.size())
        return self.dropout(weights)


def dice_loss(inputs: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """DICE loss (1 - soft F1 of the masks, +1 smoothing), summed over masks and divided by num_boxes.
    inputs: [N, ...] logits; targets: same shape, binary."""
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_boxes


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2) -> Tensor:
    """Focal loss (RetinaNet) averaged over pixels, summed over masks and divided by num_boxes."""
    loss = _tv_sigmoid_focal_loss(inputs, targets, alpha=alpha, gamma=gamma, reduction="none")
    return loss.mean(1).sum() / num_boxes


class PostProcessSegm(nn.Module):
    """Adds binary 'masks' [N, 1, H, W] (uint8) at the original image size to PostProcess's results.

    Each mask is upsampled bilinearly to the padded batch size, thresholded, cropped to its image and
    resized (nearest) to the original size, as in the original DETR, but image by image and `chunk_size`
    queries at a time, so that only a few full-resolution float maps exist at once instead of
    batch x num_queries of them (same masks). By default every query gets a mask (COCO evaluation
    ranks all of them); with `score_threshold` only queries scoring above it are kept, in all of
    the image's result fields ('scores', 'labels', 'boxes' and 'masks').
    """

    def __init__(self, threshold: float = 0.5, chunk_size: int = 10, score_threshold: float | None = None):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"PostProcessSegm: chunk_size must be at least 1, got {chunk_size}")
        self.threshold = threshold
        self.chunk_size = chunk_size
        self.score_threshold = score_threshold

    @torch.no_grad()
    def forward(self, results: list[dict], outputs: dict, orig_target_sizes: Tensor,
                max_target_sizes: Tensor) -> list[dict]:
        """max_target_sizes: [B, 2] augmented (h, w) of each image (the masks are predicted on the padded
        batch); orig_target_sizes: [B, 2] the sizes to resize to."""
        if not (len(results) == len(orig_target_sizes) == len(max_target_sizes)):
            raise ValueError("PostProcessSegm: results, orig_target_sizes and max_target_sizes differ in length")
        max_h, max_w = max_target_sizes.max(0)[0].tolist()
        outputs_masks = outputs["pred_masks"].squeeze(2)  # [B, Q, h, w] mask logits at 1/4 of the padded batch
        for i, (cur_masks, t, tt) in enumerate(zip(outputs_masks, max_target_sizes, orig_target_sizes)):
            img_h, img_w = t.tolist()
            out_h, out_w = tt.tolist()
            if self.score_threshold is not None:
                keep = results[i]["scores"] > self.score_threshold
                for key in ("scores", "labels", "boxes"):
                    if key in results[i]:
                        results[i][key] = results[i][key][keep]
                cur_masks = cur_masks[keep.to(cur_masks.device)]
            masks = torch.empty((len(cur_masks), 1, out_h, out_w), dtype=torch.uint8)  # [N, 1, H, W]
            for start in range(0, len(cur_masks), self.chunk_size):
                chunk = cur_masks[None, start:start + self.chunk_size]  # [1, n, h, w]
                chunk = F.interpolate(chunk, size=(max_h, max_w), mode="bilinear", align_corners=False)
                chunk = (chunk.sigmoid() > self.threshold)[0, :, :img_h, :img_w].cpu()
                masks[start:start + self.chunk_size] = F.interpolate(chunk[:, None].float(), size=(out_h, out_w),
                                                                     mode="nearest").byte()
            results[i]["masks"] = masks
        return results


class PostProcessPanoptic(nn.Module):
    """Merges the predicted masks into a COCO panoptic PNG + segments_info per image.

    Queries whose best class is not no-object and whose score exceeds ``threshold`` are kept; each pixel
    goes to the query with the highest mask logit; masks of the same stuff class are merged, and segments
    of at most 4 pixels are removed (repeatedly) before the final PNG.

    ``is_thing_map`` {category_id: is a thing} comes from the dataset's categories (``isthing`` in its panoptic
    JSON, ``datasets.get_is_thing_map``); queries whose class is not in it are dropped.

    The masks cover the padded batch: with ``crop_padding`` (default) they are upsampled to the padded size and
    cropped to each image. The original (``crop_padding=False``) upsampled them straight to the image's size,
    which stretches the padding of a smaller image of the batch into it (the original's README evaluates
    panoptic models with ``--batch_size 1``); for an image without padding both give the same PNG.
    """

    def __init__(self, is_thing_map: dict[int, bool], threshold: float = 0.85, crop_padding: bool = True):
        super().__init__()
        self.threshold = threshold
        self.crop_padding = crop_padding
        self.is_thing_map = is_thing_map

    @torch.no_grad()
    def forward(self, outputs: dict, processed_sizes, target_sizes=None) -> list[dict]:
        """processed_sizes: (h, w) of each image after augmentation, before padding; target_sizes: final
        (h, w) of the PNGs (default: processed_sizes). Returns per image {'png_string', 'segments_info'}."""
        import_panopticapi("utils", "PostProcessPanoptic")  # before any work, with how to install it
        if target_sizes is None:
            target_sizes = processed_sizes
        if len(processed_sizes) != len(target_sizes):
            raise ValueError("PostProcessPanoptic: processed_sizes and target_sizes differ in length")
        out_logits, raw_masks = outputs["pred_logits"], outputs["pred_masks"]
        if not (len(out_logits) == len(raw_masks) == len(target_sizes)):
            raise ValueError("PostProcessPanoptic: outputs and sizes differ in batch size")
        no_object = out_logits.shape[-1] - 1
        # the masks cover the padded batch, whose size is the largest processed size (nested_tensor_from_tensor_list)
        padded_h = max(_to_tuple(size)[0] for size in processed_sizes)
        padded_w = max(_to_tuple(size)[1] for size in processed_sizes)
        preds = []
        for cur_logits, cur_masks, size, target_size in zip(out_logits, raw_masks, processed_sizes, target_sizes):
            scores, labels = cur_logits.softmax(-1).max(-1)
            keep = labels.ne(no_object) & (scores > self.threshold)
            # a class that is no category of the dataset (e.g. an unused id below num_classes) has no place in a
            # panoptic PNG: such queries are dropped like no-object ones
            known = torch.tensor([label in self.is_thing_map for label in labels.tolist()], device=keep.device)
            keep &= known
            cur_scores, cur_classes = scores[keep], labels[keep]
            img_h, img_w = _to_tuple(size)
            upsampled = (padded_h, padded_w) if self.crop_padding else (img_h, img_w)
            cur_masks = F.interpolate(cur_masks[keep][:, None], upsampled, mode="bilinear",
                                      align_corners=False).squeeze(1)[:, :img_h, :img_w]
            h, w = cur_masks.shape[-2:]
            cur_masks = cur_masks.flatten(1)  # [n, h*w]

            stuff_equiv_classes = defaultdict(list)
            for k, label in enumerate(cur_classes.tolist()):
                if not self.is_thing_map[label]:
                    stuff_equiv_classes[label].append(k)

            def get_ids_area(masks, n, dedup=False):
                # each pixel goes to the query with the highest mask logit
                if masks.shape[0] == 0:
                    m_id = torch.zeros((h, w), dtype=torch.long, device=masks.device)
                else:
                    m_id = masks.transpose(0, 1).softmax(-1).argmax(-1).view(h, w)
                if dedup:  # all segments of a stuff class become one
                    for equiv in stuff_equiv_classes.values():
                        for eq_id in equiv[1:]:
                            m_id.masked_fill_(m_id.eq(eq_id), equiv[0])
                final_h, final_w = _to_tuple(target_size)
                seg_img = Image.fromarray(id2rgb(m_id.cpu().numpy())).resize((final_w, final_h), Image.NEAREST)
                m_id = torch.from_numpy(rgb2id(np.asarray(seg_img)))
                area = [int(m_id.eq(i).sum()) for i in range(n)]
                return area, seg_img

            area, seg_img = get_ids_area(cur_masks, len(cur_scores), dedup=True)
            if cur_classes.numel() > 0:
                # drop tiny segments until none is left
                while True:
                    filtered_small = torch.as_tensor([a <= 4 for a in area], dtype=torch.bool,
                                                     device=cur_classes.device)
                    if not filtered_small.any():
                        break
                    cur_scores = cur_scores[~filtered_small]
                    cur_classes = cur_classes[~filtered_small]
                    cur_masks = cur_masks[~filtered_small]
                    area, seg_img = get_ids_area(cur_masks, len(cur_scores))
            else:
                cur_classes = torch.ones(1, dtype=torch.long, device=cur_classes.device)

            segments_info = []
            for i, a in enumerate(area):
                cat = int(cur_classes[i])
                segments_info.append({"id": i, "isthing": self.is_thing_map[cat], "category_id": cat, "area": a})
            with io.BytesIO() as out:
                seg_img.save(out, format="PNG")
                preds.append({"png_string": out.getvalue(), "segments_info": segments_info})
        return preds


def _to_tuple(size) -> tuple[int, int]:
    if isinstance(size, tuple):
        return size
    if torch.is_tensor(size):
        return tuple(size.cpu().tolist())
    return tuple(size)
