"""datasets.synthetic: a deterministic COCO-format dataset that the regular loaders read."""
import functools
import json
import logging
from argparse import Namespace
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from pycocotools import mask as mask_util

import datasets
from datasets import synthetic


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("syn") / "data", seed=0, num_train=6, num_val=3)


def _extent(mask: np.ndarray) -> list:
    """COCO box [x, y, w, h] of a mask's pixels."""
    rows, cols = np.nonzero(mask)
    return [cols.min(), rows.min(), cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_from_seed(tiny, tmp_path):
    again = synthetic.generate(tmp_path / "again", seed=0, num_train=6, num_val=3)
    assert _files(again) == _files(tiny)  # same json, same JPEG and PNG bytes
    other = synthetic.generate(tmp_path / "other", seed=1, num_train=6, num_val=3)
    train_json = "annotations/instances_train2017.json"
    assert _files(other)[train_json] != _files(tiny)[train_json]
    # each image depends only on (seed, split, index), not on the dataset size
    more = synthetic.generate(tmp_path / "more", seed=0, num_train=7, num_val=1)
    last = Path("train2017") / "000000000006.jpg"
    assert (more / last).read_bytes() == (tiny / last).read_bytes()


def test_layout_and_no_leftovers(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == ["annotations", "train2017", "val2017"]
    assert sorted(p.name for p in tiny.parent.iterdir()) == ["data"]  # the temp folder was renamed away
    names = sorted(p.name for p in (tiny / "annotations").iterdir())
    assert names == ["instances_train2017.json", "instances_val2017.json", "panoptic_train2017",
                     "panoptic_train2017.json", "panoptic_val2017", "panoptic_val2017.json"]
    assert len(list((tiny / "train2017").glob("*.jpg"))) == 6
    assert len(list((tiny / "val2017").glob("*.jpg"))) == 3
    with pytest.raises(FileExistsError):
        synthetic.generate(tiny)


@pytest.mark.parametrize("split", ["train", "val"])
def test_instances_constraints(tiny, split):
    data = json.loads((tiny / "annotations" / f"instances_{split}2017.json").read_text())
    categories = {c["id"]: c["name"] for c in data["categories"]}
    assert len(categories) >= 3 and min(categories) == 1  # id 0 unused, as in COCO
    images = {img["id"]: img for img in data["images"]}
    for img in images.values():
        with PIL.Image.open(tiny / f"{split}2017" / img["file_name"]) as im:
            assert im.format == "JPEG" and im.size == (img["width"], img["height"])
    per_image = Counter(ann["image_id"] for ann in data["annotations"])
    assert set(per_image) == set(images) and all(1 <= n <= 4 for n in per_image.values())
    for ann in data["annotations"]:
        img = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert ann["category_id"] in categories and ann["iscrowd"] == 0
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
        # the polygons rasterise to the visible mask: its pixel count is the area, its extent the box
        rles = mask_util.frPyObjects(ann["segmentation"], img["height"], img["width"])
        mask = mask_util.decode(mask_util.merge(rles))
        assert mask.sum() == ann["area"] > 0
        assert _extent(mask) == ann["bbox"]


def test_panoptic_ids_match_segments(tiny):
    instances = json.loads((tiny / "annotations" / "instances_train2017.json").read_text())
    panoptic = json.loads((tiny / "annotations" / "panoptic_train2017.json").read_text())
    things = {c["id"] for c in panoptic["categories"] if c["isthing"]}
    stuff = {c["id"] for c in panoptic["categories"] if not c["isthing"]}
    assert len(stuff) == 2 and things == {c["id"] for c in instances["categories"]}
    for ann in panoptic["annotations"]:
        rgb = np.array(PIL.Image.open(tiny / "annotations" / "panoptic_train2017" / ann["file_name"]))
        ids = synthetic.rgb_to_id(rgb)
        present = set(np.unique(ids).tolist()) - {0}
        assert present == {s["id"] for s in ann["segments_info"]}
        for segment in ann["segments_info"]:
            region = ids == segment["id"]
            assert region.sum() == segment["area"]
            assert _extent(region) == segment["bbox"]
            assert segment["category_id"] in things | stuff and segment["iscrowd"] == 0
        # things are the same objects, with the same boxes, as the instance annotations
        inst = sorted((a["category_id"], a["bbox"]) for a in instances["annotations"]
                      if a["image_id"] == ann["image_id"])
        pan = sorted((s["category_id"], s["bbox"]) for s in ann["segments_info"]
                     if s["category_id"] in things)
        assert inst == pan


def test_build_reads_through_coco_loader(tiny):
    args = Namespace(dataset_file="synthetic", coco_path=str(tiny), masks=True, scales=[64], max_size=80,
                     val_size=64, crop_scales=[], num_classes=None)
    train = datasets.build_dataset("train", args)
    val = datasets.build_dataset("val", args)
    assert type(train).__name__ == "CocoDetection" and (len(train), len(val)) == (6, 3)
    img, target = val[0]
    assert img.shape[0] == 3 and min(img.shape[1:]) == 64
    assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"]) >= 1
    assert datasets.default_num_classes(args) == 4
    assert datasets.get_category_names(train)[1] == "ellipse"


def test_default_cache_folder(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DETR_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(synthetic, "generate", functools.partial(synthetic.generate, num_train=2, num_val=1))
    args = Namespace(dataset_file="synthetic", coco_path=None, masks=False)
    with caplog.at_level(logging.INFO):
        dataset = datasets.build_dataset("val", args)
    assert len(dataset) == 1
    assert synthetic.default_cache_dir() == tmp_path / f"synthetic-v{synthetic.VERSION}-seed0"
    assert "Generating the synthetic dataset into" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert datasets.default_num_classes(args) == 4
    assert "Using the synthetic dataset in" in caplog.text  # the second time it is reused


def test_missing_coco_path_is_not_generated(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m datasets.synthetic"):
        synthetic.build("train", Namespace(coco_path=str(tmp_path / "nope"), masks=False))


def test_command_line(tmp_path, capsys):
    synthetic.main([str(tmp_path / "cli"), "--seed", "3", "--num_train", "1", "--num_val", "1",
                    "--image_size", "64"])
    data = json.loads((tmp_path / "cli" / "annotations" / "instances_val2017.json").read_text())
    assert data["info"]["seed"] == 3 and 56 <= data["images"][0]["height"] <= 72
    assert "Wrote 1 train and 1 val images" in capsys.readouterr().out


def test_mask_to_polygons():
    diagonal = np.array([[1, 0], [0, 1]], dtype=bool)  # two 4-connected components touching at a corner
    assert sorted(synthetic.mask_to_polygons(diagonal)) == [[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0],
                                                             [2.0, 1.0, 2.0, 2.0, 1.0, 2.0, 1.0, 1.0]]
    rng = np.random.default_rng(0)
    for _ in range(30):  # random hole-free blobs round-trip through pycocotools
        mask = synthetic._smooth_noise(rng, 23, 31, cell=5) > 0.6
        if not mask.any() or synthetic._has_hole(mask):
            continue
        rles = mask_util.frPyObjects(synthetic.mask_to_polygons(mask), 23, 31)
        assert np.array_equal(mask_util.decode(mask_util.merge(rles)).astype(bool), mask)


@pytest.mark.slow
def test_default_size_dataset(tmp_path):
    root = synthetic.generate(tmp_path / "full")
    for split, n in (("train", 2000), ("val", 200)):
        data = json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())
        assert len(data["images"]) == n
        per_image = Counter(a["image_id"] for a in data["annotations"])
        assert set(per_image.values()) == {1, 2, 3, 4} and len(per_image) == n
