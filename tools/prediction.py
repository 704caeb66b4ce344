"""What a Predictor gives for one image (``Prediction``), and how its panoptic segmentation and attention maps are
cut out of the outputs of the batch it ran in."""
import dataclasses
import io
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from models.segmentation import rgb2id


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


def decode_panoptic(result: dict, names_of: Callable[[List[int]], List[str]]) -> dict:
    """PostProcessPanoptic's PNG -> an id map [H, W] (int64) and segments_info with category names."""
    with PIL.Image.open(io.BytesIO(result["png_string"])) as png:
        segmentation = torch.from_numpy(rgb2id(np.asarray(png.convert("RGB"))))
    segments = [dict(s, name=names_of([s["category_id"]])[0]) for s in result["segments_info"]]
    return {"segmentation": segmentation, "segments_info": segments, "png_string": result["png_string"]}


def image_attention(recorded: Dict[str, Tensor], mask: Tensor, i: int) -> Dict[str, Tensor]:
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
