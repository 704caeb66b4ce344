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


def test_missing_image_files_are_listed_before_loading(tmp_path):
    data = _valid_dict()
    data["images"].append(_image_entry(3))
    _write(tmp_path, data)
    for image_id in (2, 3):
        (tmp_path / "train2017" / f"{image_id:012d}.jpg").unlink()
    with pytest.raises(FileNotFoundError) as info:  # when the dataset is built: all of them, in one error
        coco.build("train", _args(tmp_path))
    message = str(info.value)
    assert "2 of the 3 image files listed in" in message and "instances_train2017.json" in message
    assert f"{tmp_path / 'train2017' / '000000000002.jpg'} (image_id 2)" in message
    assert f"{tmp_path / 'train2017' / '000000000003.jpg'} (image_id 3)" in message
    assert "--train_images" in message  # the flag that would give another folder


def test_all_image_files_missing_hints_at_the_folder(tmp_path):
    _write(tmp_path, split="val", images=False)
    with pytest.raises(FileNotFoundError) as info:
        coco.build("val", _args(tmp_path, val_images=str(tmp_path)))
    message = str(info.value)
    assert f"2 of the 2 image files listed in {tmp_path / 'annotations' / 'instances_val2017.json'} are missing " \
           f"from {tmp_path} (--val_images): is {tmp_path} (--val_images) the folder holding" in message


def test_image_file_removed_after_build(tmp_path):
    _write(tmp_path)
    dataset = coco.build("train", _args(tmp_path))
    path = tmp_path / "train2017" / "000000000002.jpg"
    path.unlink()
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


# --- any COCO-format dataset: explicit paths (--train_json --train_images --val_json --val_images) ----------------

SPARSE = {3: "cat", 7: "dog", 12: "bird"}


def _custom(root: Path, category_ids=(3, 7, 12), split="train", images=True) -> tuple[Path, Path]:
    """A COCO-format split outside the COCO layout: <root>/imgs/*.jpg and <root>/ann/<split>.json."""
    data = {
        "images": [_image_entry(1), _image_entry(2)],
        "annotations": [_ann(k + 1, 1 + k % 2, cid, [2 + k, 3, 10, 8]) for k, cid in enumerate(category_ids)],
        "categories": [{"id": cid, "name": SPARSE.get(cid, f"c{cid}")} for cid in sorted(set(category_ids))],
    }
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "ann").mkdir(exist_ok=True)
    ann_file = root / "ann" / f"{split}.json"
    ann_file.write_text(json.dumps(data))
    if images:
        for img in data["images"]:
            PIL.Image.new("RGB", (img["width"], img["height"]), (90, 120, 150)).save(root / "imgs" / img["file_name"])
    return ann_file, root / "imgs"


def _custom_args(root: Path, **kw):
    paths = {"train_json": str(root / "ann" / "train.json"), "train_images": str(root / "imgs"),
             "val_json": str(root / "ann" / "val.json"), "val_images": str(root / "imgs")}
    return Namespace(**{"dataset_file": "coco", "coco_path": None, "masks": False, "eval": False, **paths, **kw})


def test_explicit_paths_serve_any_layout(tmp_path):
    _custom(tmp_path, split="train")
    _custom(tmp_path, split="val")
    args = _custom_args(tmp_path)
    train, val = datasets.build_dataset("train", args), datasets.build_dataset("val", args)
    assert train.ann_file == tmp_path / "ann" / "train.json" and train.root == tmp_path / "imgs"
    assert val.ann_file == tmp_path / "ann" / "val.json" and len(val) == 2
    assert datasets.get_category_names(val) == SPARSE


def test_explicit_path_overrides_only_its_own(tmp_path):
    _write(tmp_path, split="val")
    ann_file, _ = _custom(tmp_path / "other", split="val", images=False)
    args = _args(tmp_path, val_json=str(ann_file))  # images still from <coco_path>/val2017
    dataset = coco.build("val", args)
    assert dataset.ann_file == ann_file and dataset.root == tmp_path / "val2017"


def test_eval_needs_only_the_val_paths(tmp_path):
    _custom(tmp_path, split="val")
    args = _custom_args(tmp_path, eval=True, train_json=None, train_images=None)
    assert len(datasets.build_dataset("val", args)) == 2
    assert datasets.default_num_classes(args) == 13  # from the val file, nothing else to read
    assert args.num_classes_source == f"max category id 12 + 1, from {tmp_path / 'ann' / 'val.json'}"
    with pytest.raises(ValueError, match=r"needs --coco_path.*or the train split's own paths: --train_images and "
                                         r"--train_json"):
        datasets.build_dataset("train", args)


def test_missing_paths_name_their_flag(tmp_path):
    _custom(tmp_path, split="train")
    args = _custom_args(tmp_path, val_json=str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match=rf"annotation file {tmp_path / 'nope.json'} not found \(--val_json\)"):
        datasets.build_dataset("val", args)
    args = _custom_args(tmp_path, train_images=str(tmp_path / "no_imgs"))
    with pytest.raises(FileNotFoundError, match=rf"image folder {tmp_path / 'no_imgs'} not found \(--train_images\)"):
        datasets.build_dataset("train", args)
    args = _custom_args(tmp_path, train_json=str(tmp_path / "gone.json"))
    with pytest.raises(FileNotFoundError,
                       match=rf"annotation file {tmp_path / 'gone.json'} not found \(--train_json\)"):
        datasets.default_num_classes(args)
    # a path derived from --coco_path says so, and which flag gives another one
    _write(tmp_path / "coco")
    with pytest.raises(FileNotFoundError, match=r"val2017 not found \(val2017 under --coco_path; --val_images gives"):
        coco.build("val", _args(tmp_path / "coco"))


def test_split_flags_are_for_the_coco_dataset_only(tmp_path):
    args = Namespace(dataset_file="synthetic", train_json=str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match="--train_json: explicit annotation and image paths are for --dataset_file"):
        datasets.build_dataset("train", args)


@pytest.mark.parametrize("ids, expected", [((3, 7, 12), 13), ((0, 1), 2), ((5,), 6)])
def test_num_classes_is_max_category_id_plus_one_of_the_training_file(tmp_path, ids, expected):
    _custom(tmp_path, category_ids=ids, split="train")
    _custom(tmp_path, category_ids=(1,), split="val")  # not read: the training file decides
    args = _custom_args(tmp_path)
    assert datasets.default_num_classes(args) == expected
    assert args.num_classes_source == f"max category id {expected - 1} + 1, from {tmp_path / 'ann' / 'train.json'}"
    train = datasets.build_dataset("train", Namespace(**dict(vars(args), num_classes=expected)))
    assert sorted(train.coco.getCatIds()) == sorted(set(ids))  # id 0 is a class like any other


def test_num_classes_of_the_original_datasets(tmp_path):
    # COCO's own layout: read from instances_train2017.json (COCO's gives 91, the original's value)
    _write(tmp_path)
    args = _args(tmp_path)
    assert datasets.default_num_classes(args) == 4
    assert "from " + str(tmp_path / "annotations" / "instances_train2017.json") in args.num_classes_source
    # with --eval and no training file: the validation file
    _write(tmp_path / "v", split="val", data={**_valid_dict(), "categories": [{"id": 40, "name": "x"}],
                                              "annotations": []})
    assert datasets.default_num_classes(_args(tmp_path / "v", eval=True)) == 41
    # nothing to read: the original's constants
    assert datasets.default_num_classes(Namespace(dataset_file="coco")) == 91
    assert datasets.default_num_classes(Namespace(dataset_file="coco_panoptic", coco_path=str(tmp_path))) == 250


def test_large_category_ids_warn_with_a_hint(tmp_path, caplog):
    _custom(tmp_path, category_ids=(1, 5000), split="train")
    with caplog.at_level("WARNING"):
        assert datasets.default_num_classes(_custom_args(tmp_path)) == 5001
    assert "the class head would have 5002 rows (max category id 5000 + 1" in caplog.text
    assert "Remap the ids to 1..2" in caplog.text
    caplog.clear()
    _custom(tmp_path, category_ids=(3, 7, 12), split="train")
    with caplog.at_level("WARNING"):
        datasets.default_num_classes(_custom_args(tmp_path))
    assert "class head" not in caplog.text


def test_annotation_of_an_unlisted_category_is_an_error(tmp_path):
    data = _valid_dict()
    data["annotations"].append(_ann(9, 2, 8, [1, 1, 4, 4]))
    _write(tmp_path, data)
    with pytest.raises(coco.DatasetError) as info:
        coco.build("train", _args(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "annotations" / "instances_train2017.json") in message
    assert "annotation id 9 (image_id 2) has category_id 8, which is not the id of any entry of 'categories' " \
           "(ids 1, 2, 3)" in message


def test_validation_category_missing_from_training_warns(tmp_path, caplog):
    _custom(tmp_path, category_ids=(3, 7), split="train")
    _custom(tmp_path, category_ids=(3, 12), split="val")
    args = _custom_args(tmp_path)
    with caplog.at_level("WARNING"):
        val = datasets.build_dataset("val", args)
    assert f"1 validation category of {tmp_path / 'ann' / 'val.json'} is not in the training file " \
           f"{tmp_path / 'ann' / 'train.json'}: 12 'bird'" in caplog.text
    # the model's categories (checkpoint, predictor): the training file's, plus the validation-only ones
    assert datasets.get_category_names(val) == SPARSE
    # with --eval there is no training file to compare with: the validation file's categories
    caplog.clear()
    with caplog.at_level("WARNING"):
        val = datasets.build_dataset("val", Namespace(**dict(vars(args), eval=True)))
    assert "validation categor" not in caplog.text
    assert datasets.get_category_names(val) == {3: "cat", 12: "bird"}


def test_annotation_file_read_ahead_is_parsed_once(tmp_path, monkeypatch):
    _custom(tmp_path, split="train")
    _custom(tmp_path, split="val")
    args = _custom_args(tmp_path)
    reads = []
    real = coco.load_json
    monkeypatch.setattr(coco, "load_json", lambda path: reads.append(Path(path).name) or real(path))
    datasets.default_num_classes(args)
    datasets.build_dataset("val", args)
    datasets.build_dataset("train", args)
    assert sorted(reads) == ["train.json", "val.json"]
    assert not coco._READ_AHEAD  # handed over to the datasets, not kept


@pytest.mark.parametrize("bbox, expected", [
    (None, "has no 'bbox'"),
    ([1, 2, 3], "'bbox' [1, 2, 3]"),
    ([1, 2, "3", 4], "'bbox' [1, 2, '3', 4]"),
    ([1, 2, float("nan"), 4], "'bbox' [1, 2, nan, 4]"),
    ([10, 12, -3, 4], "'bbox' [10, 12, -3, 4]"),  # e.g. [x0, y0, x1, y1] where [x, y, width, height] is expected
])
def test_a_box_that_is_not_x_y_width_height_is_an_error(tmp_path, bbox, expected):
    data = _valid_dict()
    bad = _ann(77, 2, 1, [1, 1, 2, 2])
    if bbox is None:
        del bad["bbox"]
    else:
        bad["bbox"] = bbox
    data["annotations"].append(bad)
    _write(tmp_path, data)
    with pytest.raises(coco.DatasetError) as info:
        coco.build("train", _args(tmp_path))
    message = str(info.value)
    assert "instances_train2017.json: annotation id 77 (image_id 2)" in message and expected in message
    assert "[x, y, width, height]" in message


def test_boxes_of_zero_width_or_height_are_named_in_a_warning(tmp_path, caplog):
    # the original drops them from the training targets (as it drops boxes a crop leaves empty): so do we, saying so
    data = _valid_dict()
    data["annotations"].append(_ann(6, 2, 1, [3, 3, 5, 0]))
    _write(tmp_path, data)
    with caplog.at_level("WARNING"):
        dataset = coco.build("train", _args(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "2 annotations" in warnings[0] and "instances_train2017.json" in warnings[0]
    assert "annotation id 3 (image_id 1, bbox [5, 5, 0, 4])" in warnings[0]
    dataset._transforms = None
    assert dataset[1][1]["boxes"].shape == (1, 4)  # image 2: annotation 5 only


def test_a_missing_area_is_the_boxes_width_times_height(tmp_path, caplog):
    # many tools write COCO files without 'area'; the targets and COCO evaluation's area ranges need it
    data = _valid_dict()
    for ann in data["annotations"]:
        del ann["area"]
    _write(tmp_path, data, split="val")
    with caplog.at_level("INFO"):
        dataset = coco.build("val", _args(tmp_path))
    assert any("5 annotations of" in r.getMessage() and "have no 'area'" in r.getMessage() for r in caplog.records)
    assert dataset.coco.anns[2]["area"] == 400.0 and dataset.coco.anns[3]["area"] == 0.0
    dataset._transforms = None
    assert torch.equal(dataset[0][1]["area"], torch.tensor([80.0, 400.0]))


@pytest.mark.parametrize("field", ["id", "file_name"])
def test_an_image_entry_without_id_or_file_name_is_an_error(tmp_path, field):
    data = _valid_dict()
    del data["images"][1][field]
    _write(tmp_path, data, images=False)
    with pytest.raises(coco.DatasetError) as info:
        coco.build("train", _args(tmp_path))
    message = str(info.value)
    assert "instances_train2017.json: entry 1 of 'images'" in message and f"has no '{field}'" in message


def test_aspect_ratio_grouping_needs_the_image_sizes_of_the_annotation_file(tmp_path):
    from datasets.samplers import aspect_ratio_groups
    data = _valid_dict()
    _write(tmp_path, data)
    del data["images"][1]["width"]
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    dataset = coco.build("train", _args(tmp_path))  # without the flag the sizes are not needed
    with pytest.raises(coco.DatasetError) as info:
        aspect_ratio_groups(dataset)
    message = str(info.value)
    assert "instances_train2017.json: image_id 2 has no 'width'" in message and "--aspect_ratio_grouping" in message
