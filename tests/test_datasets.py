"""datasets.coco and datasets.build_dataset: loading a COCO-layout folder and failing clearly on bad input."""
import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import datasets
from datasets import coco
from datasets import transforms as T


def _image_entry(image_id, w=40, h=30):
    return {"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": w, "height": h}


def _ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    x, y, w, h = bbox
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": float(w * h), "iscrowd": iscrowd,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


def _valid_dict():
    return {
        "images": [_image_entry(1), _image_entry(2)],
        "annotations": [
            _ann(1, 1, 1, [2, 3, 10, 8]),
            _ann(2, 1, 2, [30, 20, 20, 20]),        # runs over the right/bottom border: clipped
            _ann(3, 1, 2, [5, 5, 0, 4]),            # zero width: dropped
            _ann(4, 1, 1, [0, 0, 5, 5], iscrowd=1),  # crowd: dropped, as in the original
            _ann(5, 2, 3, [1, 1, 4, 4]),
        ],
        "categories": [{"id": i, "name": f"c{i}", "supercategory": "s"} for i in (1, 2, 3)],
    }


def _write(root: Path, data=None, split="train", images=True) -> Path:
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    data = _valid_dict() if data is None else data
    text = data if isinstance(data, str) else json.dumps(data)
    (root / "annotations" / f"instances_{split}2017.json").write_text(text)
    if images and not isinstance(data, str):
        for img in data["images"]:
            shape = (img["height"], img["width"], 3)
            array = np.random.default_rng(img["id"]).integers(0, 256, shape, dtype=np.uint8)
            PIL.Image.fromarray(array).save(root / f"{split}2017" / img["file_name"], quality=90)
    return root


def _args(root, **kw):
    return Namespace(**{"dataset_file": "coco", "coco_path": str(root), "masks": False, **kw})


def test_loaded_sample_has_target_fields(tmp_path):
    dataset = coco.build("train", _args(_write(tmp_path), masks=True))
    dataset._transforms = None  # raw targets, in absolute pixels
    assert len(dataset) == 2 and dataset.ids == [1, 2]
    img, target = dataset[0]
    assert img.size == (40, 30) and img.mode == "RGB"
    assert set(target) == {"boxes", "labels", "masks", "image_id", "area", "iscrowd", "orig_size", "size"}
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 11.0], [30.0, 20.0, 40.0, 30.0]]))
    assert torch.equal(target["labels"], torch.tensor([1, 2]))
    assert torch.equal(target["area"], torch.tensor([80.0, 400.0]))  # the annotation's area, unclipped
    assert torch.equal(target["iscrowd"], torch.tensor([0, 0]))
    assert torch.equal(target["image_id"], torch.tensor([1]))
    assert torch.equal(target["orig_size"], torch.tensor([30, 40]))
    assert torch.equal(target["size"], target["orig_size"])
    masks = target["masks"]
    assert masks.dtype == torch.bool and masks.shape == (2, 30, 40)
    assert masks[0].sum() == 80 and masks[0, 3:11, 2:12].all()
    assert target["boxes"].dtype == torch.float32 and target["area"].dtype == torch.float32


def test_transforms_from_args(tmp_path):
    args = _args(_write(tmp_path, split="val"), scales=[32], max_size=48, val_size=24, crop_scales=[],
                 crop_size=(8, 16))
    dataset = coco.build("val", args)
    img, target = dataset[0]
    assert img.shape == (3, 24, 32)
    assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()  # normalised cxcywh
    # old Namespaces without the size flags get the original's transforms
    old = coco.transforms_from_args("train", Namespace())
    assert old.transforms[1].transforms1.sizes == list(T.DEFAULT_SCALES)
    assert old.transforms[1].transforms1.max_size == 1333


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"COCO folder {tmp_path / 'nope'}"):
        coco.build("train", _args(tmp_path / "nope"))


def test_missing_annotation_file(tmp_path):
    (tmp_path / "train2017").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_train2017.json not found"):
        coco.build("train", _args(tmp_path))


def test_missing_image_folder(tmp_path):
    _write(tmp_path)
    with pytest.raises(FileNotFoundError, match="val2017 not found"):
        coco.build("val", _args(tmp_path))


def test_malformed_json(tmp_path):
    _write(tmp_path, data='{"images": [{"id": 1,}]}')
    with pytest.raises(coco.DatasetError) as info:
        coco.build("train", _args(tmp_path))
    message = str(info.value)
    assert "malformed JSON" in message and "instances_train2017.json" in message
    assert "line 1, column" in message


def test_annotation_image_missing(tmp_path):
    data = _valid_dict()
    data["annotations"].append(_ann(77, 99, 1, [1, 1, 2, 2]))
    _write(tmp_path, data)
    with pytest.raises(coco.DatasetError, match="annotation id 77 refers to image_id 99, which is not in"):
        coco.build("train", _args(tmp_path))


def test_category_id_out_of_range(tmp_path):
    _write(tmp_path)
    with pytest.raises(coco.DatasetError) as info:
        coco.build("train", _args(tmp_path, num_classes=3))
    message = str(info.value)
    assert "annotation id 5 (image_id 2) has category_id 3" in message and "--num_classes=3" in message
    coco.build("train", _args(tmp_path, num_classes=4))  # max id + 1 is enough
    coco.build("train", _args(tmp_path, num_classes=None))  # no check when the flag is unset


def test_empty_split(tmp_path):
    _write(tmp_path, {"images": [], "annotations": [], "categories": []})
    with pytest.raises(coco.DatasetError, match="empty split"):
        coco.build("train", _args(tmp_path))


def test_missing_image_file(tmp_path):
    _write(tmp_path)
    path = tmp_path / "train2017" / "000000000002.jpg"
    path.unlink()
    dataset = coco.build("train", _args(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"image file {path} \(image_id 2"):
        dataset[1]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_image_file(tmp_path, damage):
    _write(tmp_path)
    path = tmp_path / "train2017" / "000000000001.jpg"
    data = path.read_bytes()
    path.write_bytes(b"not a jpeg" * 10 if damage == "garbage" else data[: len(data) // 2])
    dataset = coco.build("train", _args(tmp_path))
    with pytest.raises(coco.DatasetError, match=rf"corrupted image file {path} \(image_id 1\)"):
        dataset[0]


def test_build_dataset_dispatch_and_coco_api(tmp_path):
    _write(tmp_path)
    dataset = datasets.build_dataset("train", _args(tmp_path))
    subset = torch.utils.data.Subset(dataset, [1])
    assert datasets.get_coco_api_from_dataset(subset) is dataset.coco
    assert datasets.get_category_names(subset) == {1: "c1", 2: "c2", 3: "c3"}
    assert datasets.default_num_classes(Namespace(dataset_file="coco")) == 91
    assert datasets.default_num_classes(Namespace(dataset_file="coco_panoptic")) == 250
    with pytest.raises(ValueError, match="needs --coco_path"):
        datasets.build_dataset("train", Namespace(dataset_file="coco_panoptic"))
    with pytest.raises(ValueError, match="not supported"):
        datasets.build_dataset("train", Namespace(dataset_file="voc"))
