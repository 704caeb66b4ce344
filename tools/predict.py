"""Run a trained DETR on your own images and write what it finds (the Python API is tools/inference.py).

    # a checkpoint of this repository (or of the original), on a folder and a single file
    python -m tools.predict --resume runs/synthetic/checkpoint.pth --images photos/ cat.jpg --output_dir out
    # a published model through torch.hub's cache (downloaded once), with the paper's attention figures
    python -m tools.predict --hub detr_resnet50 --images photos/ --output_dir out --threshold 0.9 --attention

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
"""
import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from datasets.coco_eval import prepare_for_coco_detection, prepare_for_coco_segmentation
from tools.images import ImageError, describe, expand_inputs
from tools.inference import AMP_CHOICES, Prediction, Predictor, add_model_arguments
from util.checkpoint import atomic_write

logger = logging.getLogger(__name__)


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
    with atomic_write(str(path), "w") as f:
        json.dump(data, f)


def write_png(path: Path, data: bytes) -> None:
    with atomic_write(str(path), "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------------------------
# The command


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m tools.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, "run")
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
    parser.add_argument("--amp", default="off", choices=AMP_CHOICES,
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
    from tools import visualize

    output_dir = Path(args.output_dir)
    sources = expand_inputs(args.images)  # fails early on an empty folder or a missing path
    names = output_names([describe(s, i) for i, s in enumerate(sources)])
    kwargs = dict(device=args.device, amp=args.amp, panoptic_threshold=args.panoptic_threshold,
                  val_size=args.val_size, max_size=args.max_size)
    # both fill what is None (sizes, names) from the loaded model (Predictor.from_loaded)
    open_model = Predictor.from_hub if args.hub else Predictor.from_checkpoint
    predictor = open_model(args.hub or args.resume, category_names=args.categories, **kwargs)
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
