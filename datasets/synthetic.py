"""A small synthetic dataset in the COCO formats, so everything runs offline and on a CPU.

    python -m datasets.synthetic OUT_DIR [--seed 0 --num_train 2000 --num_val 200 --image_size 128]

writes, deterministically from the seed,

    OUT_DIR/train2017/*.jpg, OUT_DIR/val2017/*.jpg                      (JPEG, quality 90)
    OUT_DIR/annotations/instances_{train,val}2017.json                   (COCO instances)
    OUT_DIR/annotations/panoptic_{train,val}2017.json                    (COCO panoptic)
    OUT_DIR/annotations/panoptic_{train,val}2017/*.png                   (id = R + 256 G + 256^2 B)

Each image has a textured background split by a wavy horizon into two "stuff" regions ('sky' above,
'ground' below; panoptic only) and 1-4 objects whose class is their SHAPE (ellipse, rectangle,
triangle); colours are random per object, so colour says nothing about the class. Sides are
about 20%-50% of the image side. Objects drawn later occlude earlier ones and objects may be cut by
the image border.

Annotations describe what is VISIBLE: an object's mask is exactly its unoccluded pixels inside the
image; its polygon(s) trace the pixel boundary of that mask (a staircase along pixel edges, which
pycocotools rasterises back to the same pixels); its box is the extent of that mask and its area the
pixel count. Layouts that would leave less than 70% of an object visible, or with a hole (a COCO polygon
cannot describe one), are redrawn, so every annotation is honest.

The training recipe for this data (`--dataset_file synthetic`) is `datasets.recipes.SYNTHETIC_RECIPE`.

`build(image_set, args)` reads `args.coco_path` when set; otherwise it generates the default dataset
once into a cache folder and reads it with the regular COCO loader (`datasets.coco.build`).
"""
import argparse
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional, Union

import numpy as np
import PIL.Image
import PIL.ImageDraw
from scipy import ndimage

from util.errors import UserFileNotFoundError

VERSION = 2

logger = logging.getLogger(__name__)

THING_CATEGORIES = [
    {"id": 1, "name": "ellipse", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
STUFF_CATEGORIES = [
    {"id": 4, "name": "sky", "supercategory": "background"},
    {"id": 5, "name": "ground", "supercategory": "background"},
]
SKY, GROUND = 4, 5
SPLIT_IDS = {"train": 0, "val": 1}
FIRST_IMAGE_ID = {"train": 1, "val": 1_000_001}  # distinct ids across splits, as in COCO

MIN_VISIBLE_FRACTION = 0.7  # of an object's full polygon area, after occlusion and border truncation
MIN_VISIBLE_PIXELS = 16


# ----------------------------------------------------------------------------------------------
# Drawing


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """[h, w] float noise in about [0, 1], smooth at the scale of `cell` pixels."""
    coarse = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
    return np.asarray(PIL.Image.fromarray(coarse, mode="F").resize((w, h), PIL.Image.BICUBIC))


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """[h, w, 3] float: one of a gradient, stripes or blotches between two nearby random colours."""
    a = _random_colour(rng)
    b = np.clip(a + rng.uniform(-70, 70, size=3), 0, 255).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    elif kind == 1:  # soft stripes
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 24)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    else:  # blotches
        t = _smooth_noise(rng, h, w, cell=int(rng.integers(6, 20)))
    t = np.clip(t + 0.25 * (_smooth_noise(rng, h, w, cell=4) - 0.5), 0, 1)
    return a + (b - a) * t[..., None]


def _shape_polygon(rng: np.random.Generator, category_id: int, cx: float, cy: float,
                   size: float) -> np.ndarray:
    """[K, 2] (x, y) vertices of a shape about `size` pixels across, centred on (cx, cy)."""
    r = size / 2
    if category_id == 1:  # ellipse
        aspect = rng.uniform(0.6, 1.0)
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([r * np.cos(t), r * aspect * np.sin(t)], axis=1)
        angle = rng.uniform(0, np.pi)
    elif category_id == 2:  # rectangle
        aspect = rng.uniform(0.5, 1.0)
        hx = r / np.sqrt(1 + aspect ** 2)  # half-diagonal r
        hy = aspect * hx
        pts = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
        angle = rng.uniform(-np.pi / 9, np.pi / 9)
    elif category_id == 3:  # triangle, not far from equilateral
        t = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.25, 0.25, size=3)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
        angle = rng.uniform(0, 2 * np.pi)
    else:
        raise ValueError(f"unknown category_id {category_id}")
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rotation.T + np.array([cx, cy])


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _rasterize(pts: np.ndarray, h: int, w: int) -> np.ndarray:
    canvas = PIL.Image.new("L", (w, h), 0)
    PIL.ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def _layout_ok(instance_map: np.ndarray, full_areas: list[float]) -> bool:
    """Every object is at least MIN_VISIBLE_FRACTION visible and its visible mask has no hole."""
    for k, full_area in enumerate(full_areas, start=1):
        visible = instance_map == k
        count = int(visible.sum())
        if count < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * full_area):
            return False
        if _has_hole(visible):
            return False
    return True


def _has_hole(mask: np.ndarray) -> bool:
    """Whether some background of `mask` is enclosed by it (4-connected background, as COCO polygons
    rasterise)."""
    rows, cols = np.nonzero(mask)
    crop = np.pad(mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1], 1)
    _, num_background_regions = ndimage.label(~crop)
    return num_background_regions > 1


def _draw_sample(rng: np.random.Generator, image_size: int):
    """One image: uint8 [h, w, 3], the instance map [h, w] (0 = background, k = k-th object),
    the object categories, and the sky mask."""
    h, w = (int(round(image_size * s)) for s in rng.uniform(0.875, 1.125, size=2))

    # background: two textures split by a wavy, tilted horizon
    xs = np.arange(w, dtype=np.float32)
    base, tilt, amplitude = rng.uniform(0.3, 0.7), rng.uniform(-0.3, 0.3), rng.uniform(0, 0.06)
    wave = np.sin(2 * np.pi * xs / rng.uniform(0.5, 1.5) / w + rng.uniform(0, 6.3))
    horizon = base * h + tilt * (xs - w / 2) + amplitude * h * wave
    sky = np.arange(h, dtype=np.float32)[:, None] < horizon[None, :]
    canvas = np.where(sky[..., None], _texture(rng, h, w), _texture(rng, h, w))

    # objects, redrawn when they would make an earlier one (or themselves) mostly hidden
    num_objects = int(rng.integers(1, 5))
    instance_map = np.zeros((h, w), dtype=np.int32)
    categories, full_areas, masks = [], [], []
    side = min(h, w)
    for _ in range(num_objects):
        for _attempt in range(30):
            category_id = int(rng.integers(1, len(THING_CATEGORIES) + 1))
            size = rng.uniform(0.2, 0.5) * side
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            pts = _shape_polygon(rng, category_id, cx, cy, size)
            mask = _rasterize(pts, h, w)
            candidate = instance_map.copy()
            candidate[mask] = len(categories) + 1
            if _layout_ok(candidate, full_areas + [_polygon_area(pts)]):
                instance_map = candidate
                categories.append(category_id)
                full_areas.append(_polygon_area(pts))
                masks.append(mask)
                break

    # paint objects in order: a random colour that stands out from the background under it,
    # with a little shading
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for mask in masks:
        under = canvas[mask].mean(axis=0)
        colour = _random_colour(rng)
        for _ in range(10):
            if np.linalg.norm(colour - under) > 80:
                break
            colour = _random_colour(rng)
        angle = rng.uniform(0, 2 * np.pi)
        shade = 1 + 0.15 * np.sin(angle) * (yy - h / 2) / h + 0.15 * np.cos(angle) * (xx - w / 2) / w
        canvas[mask] = (colour[None, :] * shade[mask][:, None])
    canvas += rng.normal(0, 3, size=canvas.shape).astype(np.float32)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, instance_map, categories, sky


# ----------------------------------------------------------------------------------------------
# Annotations


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer boundaries of a hole-free bool mask [H, W] as COCO polygons [[x0, y0, x1, y1, ...], ...].

    Vertices are pixel corners: pixel (row r, column c) spans [c, c + 1] x [r, r + 1]. Each
    4-connected component gives one polygon; pycocotools rasterises them back to the same pixels.
    """
    padded = np.pad(mask, 1)
    inside = padded[1:-1, 1:-1]
    # directed boundary edges with the mask on their right (y points down): (x0, y0, dx, dy)
    edges = []
    for exposed, offset, direction in (
        (inside & ~padded[:-2, 1:-1], (0, 0), (1, 0)),   # top side, left to right
        (inside & ~padded[1:-1, 2:], (1, 0), (0, 1)),    # right side, downwards
        (inside & ~padded[2:, 1:-1], (1, 1), (-1, 0)),   # bottom side, right to left
        (inside & ~padded[1:-1, :-2], (0, 1), (0, -1)),  # left side, upwards
    ):
        rows, cols = np.nonzero(exposed)
        edges.extend(zip((cols + offset[0]).tolist(), (rows + offset[1]).tolist(),
                         [direction[0]] * len(rows), [direction[1]] * len(rows)))
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for x, y, dx, dy in edges:
        outgoing.setdefault((x, y), []).append((dx, dy))

    remaining = set(edges)
    polygons = []
    while remaining:
        first = edge = min(remaining)
        corners = []
        while True:
            remaining.remove(edge)
            x, y, dx, dy = edge
            vertex = (x + dx, y + dy)
            choices = outgoing[vertex]
            # where two pixels touch only at a corner there are two ways on: turn towards the mask
            # (right) so that each 4-connected component is traced on its own
            direction = choices[0] if len(choices) == 1 else (-dy, dx)
            if direction != (dx, dy):
                corners.append(vertex)
            edge = (*vertex, *direction)
            if edge == first:
                break
        polygons.append([float(v) for corner in corners for v in corner])
    return polygons


def _bbox(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    x0, y0, x1, y1 = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _segment_ids(rng: np.random.Generator, count: int) -> list[int]:
    """Distinct non-zero panoptic ids (0 is 'unlabelled')."""
    ids: list[int] = []
    while len(ids) < count:
        candidate = int(rng.integers(1, 256 ** 3))
        if candidate not in ids:
            ids.append(candidate)
    return ids


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """[H, W] int panoptic ids -> [H, W, 3] uint8, id = R + 256 G + 256^2 B."""
    return np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]


# ----------------------------------------------------------------------------------------------
# Writing a dataset


def _write_split(root: Path, split: str, num_images: int, seed: int, image_size: int, info: dict) -> None:
    image_dir = root / f"{split}2017"
    panoptic_dir = root / "annotations" / f"panoptic_{split}2017"
    image_dir.mkdir(parents=True)
    panoptic_dir.mkdir(parents=True)
    images, annotations, panoptic_annotations = [], [], []
    for index in range(num_images):
        image_id = FIRST_IMAGE_ID[split] + index
        # one generator per image: any image can be regenerated alone, whatever the dataset size
        rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
        image, instance_map, categories, sky = _draw_sample(rng, image_size)
        h, w = instance_map.shape
        file_name = f"{image_id:012d}.jpg"
        PIL.Image.fromarray(image).save(image_dir / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})

        segment_ids = _segment_ids(rng, len(categories) + 2)
        panoptic = np.zeros((h, w), dtype=np.int64)
        segments_info = []
        for k, category_id in enumerate(categories, start=1):
            visible = instance_map == k
            bbox, area = _bbox(visible), int(visible.sum())
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                "bbox": bbox, "area": float(area), "iscrowd": 0, "segmentation": mask_to_polygons(visible),
            })
            panoptic[visible] = segment_ids[k - 1]
            segments_info.append({"id": segment_ids[k - 1], "category_id": category_id, "iscrowd": 0,
                                  "bbox": bbox, "area": area})
        for segment_id, category_id, region in ((segment_ids[-2], SKY, sky), (segment_ids[-1], GROUND, ~sky)):
            region = region & (instance_map == 0)
            if region.any():
                panoptic[region] = segment_id
                segments_info.append({"id": segment_id, "category_id": category_id, "iscrowd": 0,
                                      "bbox": _bbox(region), "area": int(region.sum())})
        png_name = f"{image_id:012d}.png"
        PIL.Image.fromarray(id_to_rgb(panoptic)).save(panoptic_dir / png_name)
        panoptic_annotations.append({"image_id": image_id, "file_name": png_name,
                                     "segments_info": segments_info})

    with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump({"info": info, "licenses": [], "images": images, "annotations": annotations,
                   "categories": THING_CATEGORIES}, f)
    panoptic_categories = ([dict(c, isthing=1) for c in THING_CATEGORIES]
                           + [dict(c, isthing=0) for c in STUFF_CATEGORIES])
    palette = np.random.default_rng(seed).integers(0, 256, size=(len(panoptic_categories), 3))
    for category, colour in zip(panoptic_categories, palette.tolist()):
        category["color"] = colour
    with open(root / "annotations" / f"panoptic_{split}2017.json", "w") as f:
        json.dump({"info": info, "licenses": [], "images": images, "annotations": panoptic_annotations,
                   "categories": panoptic_categories}, f)


def generate(out_dir: Union[str, Path], seed: int = 0, num_train: int = 2000, num_val: int = 200,
             image_size: int = 128) -> Path:
    """Write the dataset to `out_dir` (which must not exist yet) and return its path.

    It is written to a temporary folder beside `out_dir` and renamed into place when complete, so
    `out_dir` never holds a partial dataset. If another process completes it first, theirs is kept.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; the synthetic generator only writes a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    info = {"description": "DETR synthetic shapes", "generator": "datasets.synthetic", "version": VERSION,
            "seed": seed, "num_train": num_train, "num_val": num_val, "image_size": image_size}
    # a fresh hidden folder beside out_dir (mkdir, unlike mkdtemp, keeps the usual permissions)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / "annotations").mkdir()
        _write_split(tmp, "train", num_train, seed, image_size, info)
        _write_split(tmp, "val", num_val, seed, image_size, info)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "annotations" / "instances_val2017.json").is_file():
                raise
            # another process finished the same dataset first: keep theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def default_cache_dir(seed: int = 0) -> Path:
    """`$DETR_DATA_DIR/synthetic-v<VERSION>-seed<seed>`, or under `~/.cache/detr` when DETR_DATA_DIR is unset."""
    root = os.environ.get("DETR_DATA_DIR")
    root = Path(root) if root else Path.home() / ".cache" / "detr"
    return root / f"synthetic-v{VERSION}-seed{seed}"


def dataset_root(args) -> Path:
    """The folder to read: `args.coco_path` when set, else the cached default dataset (generated once)."""
    coco_path = getattr(args, "coco_path", None)
    if coco_path:
        root = Path(coco_path)
        if not root.is_dir():
            raise UserFileNotFoundError(f"synthetic dataset folder {root} (--coco_path) not found; create one "
                                    f"with `python -m datasets.synthetic {root}` or leave --coco_path unset "
                                    f"to use the cached default")
        return root
    root = default_cache_dir(getattr(args, "synthetic_seed", 0))
    if not root.is_dir():
        logger.info("Generating the synthetic dataset into %s (once; set DETR_DATA_DIR to choose the folder)", root)
        start = time.time()
        generate(root, seed=getattr(args, "synthetic_seed", 0))
        logger.info("Synthetic dataset ready in %.1fs", time.time() - start)
    else:
        logger.info("Using the synthetic dataset in %s", root, extra={"once": True})  # (asked for by every split)
    return root


def build(image_set: str, args):
    """The synthetic data read through the regular COCO loader: no code path exists only for it."""
    from argparse import Namespace

    from . import coco

    return coco.build(image_set, Namespace(**dict(vars(args), coco_path=str(dataset_root(args)))))


def build_panoptic(image_set: str, args):
    """The synthetic data read through the regular COCO panoptic loader (`datasets.coco_panoptic.build`), with
    the images, the panoptic PNGs + JSON and the detection annotations all in one folder."""
    from argparse import Namespace

    from . import coco_panoptic

    root = str(dataset_root(args))
    return coco_panoptic.build(image_set, Namespace(**dict(vars(args), coco_path=root, coco_panoptic_path=root)))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic COCO-format shapes dataset.")
    parser.add_argument("out_dir", help="folder to create (must not exist)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    parser.add_argument("--num_train", type=int, default=2000, help="number of training images")
    parser.add_argument("--num_val", type=int, default=200, help="number of validation images")
    parser.add_argument("--image_size", type=int, default=128,
                        help="typical image side (each side varies by +-12.5%%)")
    args = parser.parse_args(argv)
    start = time.time()
    out = generate(args.out_dir, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                   image_size=args.image_size)
    print(f"Wrote {args.num_train} train and {args.num_val} val images to {out} "
          f"in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
