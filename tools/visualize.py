"""Drawings of predictions and of DETR's attention, as in the paper's figures (matplotlib's Agg canvas: never a
window; figures are returned, so a notebook can show them too).

    from tools.inference import Predictor
    from tools.visualize import plot_prediction, plot_attention, save_figure
    p = Predictor.from_checkpoint("runs/synthetic/checkpoint.pth")("image.jpg", attention=True)[0]
    save_figure(plot_prediction(p), "boxes.png")          # boxes, names and scores (+ masks / panoptic segments)
    save_figure(plot_attention(p), "attention.png")       # decoder cross-attention of each detection (the paper's
                                                          # Fig. 6) and encoder self-attention at its centre (Fig. 3)
    plot_encoder_attention(p, points=[(40, 60)])          # self-attention at chosen pixels (x, y) of the image

Attention maps live on the backbone's feature map (1/32 of the resized image, 1/16 for DC5 or --backbone_last_layer
layer3); they are drawn over the image with each feature cell covering the pixels it was computed from.
"""
import io
import logging
import math
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

logger = logging.getLogger(__name__)

_PALETTE = colormaps["tab20"].colors  # a colour per category id (and per panoptic segment)


def _colour(i: int) -> tuple:
    return tuple(_PALETTE[(2 * int(i) + int(i) // 10) % len(_PALETTE)])  # neighbouring ids get distinct hues


def _image_axes(width: int, height: int, min_side: int = 480, max_side: int = 1333):
    """A figure the size of the image (scaled so that labels stay readable on small images and big images stay
    small), with one axes filling it."""
    scale = min(max(1.0, min_side / min(width, height)), max_side / max(width, height))
    dpi = 100
    fig = Figure(figsize=(width * scale / dpi, height * scale / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    return fig, ax


def _label(ax, x: float, y: float, text: str, colour, fontsize: float = 9, below: bool = False,
           right: bool = False) -> None:
    """A label on a coloured background with its lower left corner at (x, y) (upper with ``below``, right with
    ``right``)."""
    ax.text(x, y, text, fontsize=fontsize, color="white", va="top" if below else "bottom",
            ha="right" if right else "left", clip_on=True,
            bbox=dict(facecolor=colour, alpha=0.75, pad=1.5, edgecolor="none"))


def draw_boxes(ax, prediction, indices: Optional[Sequence[int]] = None, labels: bool = True) -> None:
    """Boxes (with 'name score' labels) of the detections ``indices`` (default: all) on ``ax``."""
    indices = range(len(prediction.scores)) if indices is None else indices
    height, width = prediction.size
    for k in indices:
        x0, y0, x1, y1 = prediction.boxes[k].tolist()
        colour = _colour(prediction.labels[k])
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2))
        if labels:
            # a box touching the top of the image gets its label inside; one near the right edge, right-aligned
            _label(ax, x1 if x0 > 0.6 * width else x0, y0, f"{prediction.names[k]} {float(prediction.scores[k]):.2f}",
                   colour, below=y0 < 0.06 * height, right=x0 > 0.6 * width)


def _overlay(masks: np.ndarray, colours: Sequence[tuple], alpha: float) -> np.ndarray:
    """[N, H, W] bool masks -> an RGBA [H, W, 4] image, each mask in its colour (later masks on top)."""
    rgba = np.zeros(masks.shape[1:] + (4,), dtype=np.float32)
    for mask, colour in zip(masks, colours):
        rgba[mask, :3] = colour[:3]
        rgba[mask, 3] = alpha
    return rgba


def plot_prediction(prediction, alpha: float = 0.45) -> Figure:
    """The image with its detections: boxes with class names and scores; instance masks overlaid for mask models;
    the panoptic segmentation (segments coloured and named) for panoptic models."""
    width, height = prediction.image.size
    fig, ax = _image_axes(width, height)
    ax.imshow(prediction.image)
    if prediction.panoptic is not None:
        draw_panoptic(ax, prediction.panoptic, alpha=alpha + 0.1)
    elif prediction.masks is not None and len(prediction.masks):
        colours = [_colour(label) for label in prediction.labels.tolist()]
        ax.imshow(_overlay(prediction.masks.numpy(), colours, alpha))
    if prediction.panoptic is None:
        draw_boxes(ax, prediction)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    return fig


def draw_panoptic(ax, panoptic: dict, alpha: float = 0.55) -> None:
    """A panoptic segmentation ({'segmentation' [H, W] segment ids, 'segments_info'}) over the image on ``ax``:
    a colour per segment, its name at its centre of mass."""
    seg = panoptic["segmentation"].numpy()
    infos = panoptic["segments_info"]
    masks = np.stack([seg == s["id"] for s in infos]) if infos else np.zeros((0,) + seg.shape, dtype=bool)
    ax.imshow(_overlay(masks, [_colour(s["id"] * 7 + s["category_id"]) for s in infos], alpha))
    for s, mask in zip(infos, masks):
        if mask.any():
            ys, xs = np.nonzero(mask)
            name = s.get("name", str(s["category_id"]))
            ax.text(xs.mean(), ys.mean(), name, fontsize=8, color="white", ha="center", va="center",
                    bbox=dict(facecolor="black", alpha=0.5, pad=1, edgecolor="none"))


# ----------------------------------------------------------------------------------------------
# Attention


def _layer_key(attention: dict, kind: str, layer: int) -> str:
    """The key of ``kind`` ('decoder.{}.cross_attn' or 'encoder.{}.self_attn') for ``layer`` (-1: the last)."""
    pattern = re.compile(re.escape(kind).replace(r"\{\}", r"(\d+)"))
    layers = sorted(int(m.group(1)) for key in attention or {} if (m := pattern.fullmatch(key)))
    if not layers:
        raise ValueError("the prediction has no attention maps: predict with attention=True")
    try:
        return kind.format(layers[layer])
    except IndexError:
        raise ValueError(f"layer {layer}: the model has {len(layers)} such layers") from None


def _feature_stride(prediction, feature_hw: tuple) -> int:
    """The backbone's stride (16 or 32): resized input size / feature map size, rounded to a power of two."""
    (in_h, in_w), (h, w) = prediction.input_size, feature_hw
    return 2 ** round(math.log2(max(in_h / h, in_w / w)))


def _extent(prediction, feature_hw: tuple) -> tuple:
    """Where the feature map lies over the image: cell (i, j) covers the input pixels [i s, (i + 1) s) x [j s, ...),
    mapped back to the image's pixels (the last cells may reach past the image's border)."""
    stride = _feature_stride(prediction, feature_hw)
    (in_h, in_w), (h, w) = prediction.input_size, feature_hw
    height, width = prediction.size
    return (0, w * stride * width / in_w, h * stride * height / in_h, 0)


def decoder_attention_map(prediction, k: int, layer: int = -1) -> Tensor:
    """[h, w] cross-attention (averaged over heads) of the query behind detection ``k`` over the feature map."""
    key = _layer_key(prediction.attention, "decoder.{}.cross_attn", layer)
    return prediction.attention[key][int(prediction.queries[k])]


def encoder_attention_map(prediction, point: tuple, layer: int = -1) -> Tensor:
    """[h, w] self-attention (averaged over heads) of the feature cell under ``point`` = (x, y), in the image's
    pixels, over the feature map."""
    key = _layer_key(prediction.attention, "encoder.{}.self_attn", layer)
    weights = prediction.attention[key]  # [h, w, h, w]
    i, j = feature_cell(prediction, point, weights.shape[:2])
    return weights[i, j]


def feature_cell(prediction, point: tuple, feature_hw: tuple) -> tuple:
    """(row, column) of the feature cell that covers the pixel ``point`` = (x, y) of the image."""
    x, y = point
    height, width = prediction.size
    (in_h, in_w), (h, w) = prediction.input_size, feature_hw
    stride = _feature_stride(prediction, feature_hw)
    i = min(max(int(y * in_h / height // stride), 0), h - 1)
    j = min(max(int(x * in_w / width // stride), 0), w - 1)
    return i, j


def _show_map(ax, prediction, att: Tensor, title: str) -> None:
    height, width = prediction.size
    ax.imshow(prediction.image, alpha=0.5)
    ax.imshow(att.numpy(), extent=_extent(prediction, tuple(att.shape)), cmap="viridis", alpha=0.7,
              interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _grid(rows: int, cols: int, prediction, panel: float = 2.6) -> tuple:
    """Panels of the image's aspect ratio with room for a title each (fixed margins: tight_layout would cost more
    than the drawing)."""
    height, width = prediction.size
    title = 0.3  # inches
    fig_w, fig_h = panel * cols, (panel * height / width + title) * rows
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False,
                        gridspec_kw=dict(left=0.01, right=0.99, bottom=0.01, top=1 - 0.9 * title / fig_h,
                                         wspace=0.04, hspace=title / (panel * height / width)))
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _top(prediction, max_predictions: int) -> list:
    order = prediction.scores.argsort(descending=True).tolist()
    return order[:max_predictions]


def plot_decoder_attention(prediction, detections: Optional[Sequence[int]] = None, layer: int = -1) -> Figure:
    """The paper's decoder figure: for each detection (default: the 4 highest-scoring), the cross-attention of its
    query over the image (top) and its box (bottom)."""
    detections = _top(prediction, 4) if detections is None else list(detections)
    if not detections:
        raise ValueError("no detections to show (lower the score threshold?)")
    fig, axes = _grid(2, len(detections), prediction)
    for col, k in enumerate(detections):
        _show_map(axes[0, col], prediction, decoder_attention_map(prediction, k, layer),
                  f"query {int(prediction.queries[k])}")
        ax = axes[1, col]
        ax.imshow(prediction.image)
        draw_boxes(ax, prediction, [k], labels=False)
        ax.set_title(f"{prediction.names[k]} {float(prediction.scores[k]):.2f}", fontsize=9)
        ax.set_axis_off()
    return fig


def plot_encoder_attention(prediction, points: Sequence[tuple], layer: int = -1) -> Figure:
    """The paper's encoder figure: the image with the chosen pixels ``points`` [(x, y), ...] marked (left) and the
    self-attention of the feature cell under each of them (right)."""
    if not points:
        raise ValueError("no points given: pass pixels (x, y) of the image")
    fig, axes = _grid(1, len(points) + 1, prediction)
    ax = axes[0, 0]
    ax.imshow(prediction.image)
    ax.set_axis_off()
    ax.set_title("points", fontsize=9)
    for n, (x, y) in enumerate(points):
        ax.plot([x], [y], marker="o", markersize=6, color=_colour(n), markeredgecolor="white")
        att = encoder_attention_map(prediction, (x, y), layer)
        _show_map(axes[0, n + 1], prediction, att, f"self-attention at ({x:.0f}, {y:.0f})")
        axes[0, n + 1].plot([x], [y], marker="o", markersize=6, color=_colour(n), markeredgecolor="white")
    return fig


def plot_attention(prediction, max_predictions: int = 4, layer: int = -1) -> Figure:
    """One figure per image: the detections (first column), then for each of the ``max_predictions`` best ones
    its decoder cross-attention (top row) and the encoder self-attention at its box centre (bottom row)."""
    detections = _top(prediction, max_predictions)
    cols = max(len(detections), 1) + 1
    fig, axes = _grid(2, cols, prediction)
    ax = axes[0, 0]
    ax.imshow(prediction.image)
    draw_boxes(ax, prediction, detections)
    ax.set_title("detections", fontsize=9)
    ax.set_axis_off()
    centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in prediction.boxes[detections].tolist()]
    ax = axes[1, 0]
    ax.imshow(prediction.image)
    for n, (x, y) in enumerate(centres):
        ax.plot([x], [y], marker="o", markersize=6, color=_colour(prediction.labels[detections[n]]),
                markeredgecolor="white")
    ax.set_title("box centres", fontsize=9)
    ax.set_axis_off()
    for col, (k, centre) in enumerate(zip(detections, centres), start=1):
        _show_map(axes[0, col], prediction, decoder_attention_map(prediction, k, layer),
                  f"decoder: {prediction.names[k]} {float(prediction.scores[k]):.2f}")
        draw_boxes(axes[0, col], prediction, [k], labels=False)
        _show_map(axes[1, col], prediction, encoder_attention_map(prediction, centre, layer), "encoder at centre")
        axes[1, col].plot([centre[0]], [centre[1]], marker="o", markersize=6, color="red", markeredgecolor="white")
    if not detections:
        for row in range(2):
            axes[row, 1].set_axis_off()
            axes[row, 1].set_title("no detection above the threshold", fontsize=9)
    return fig


def save_figure(fig: Figure, path: Union[str, Path]) -> None:
    """Write ``fig`` as a PNG, atomically (a complete file or none)."""
    from util.checkpoint import atomic_write

    buffer = io.BytesIO()
    # zlib level 1: several times faster than PIL's default 6, files about a third larger
    fig.savefig(buffer, format="png", pil_kwargs={"compress_level": 1})
    with atomic_write(str(path), "wb") as f:
        f.write(buffer.getvalue())
