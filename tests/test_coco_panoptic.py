"""datasets.coco_panoptic: decoding COCO panoptic PNGs into targets, both folder layouts, and clear errors."""
import json
import random
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import datasets
from datasets import coco, coco_panoptic, synthetic
from datasets import transforms as T

SEED, IMAGE_SIZE = 3, 64


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("pan") / "data", seed=SEED, num_train=8, num_val=4,
                              image_size=IMAGE_SIZE)


@pytest.fixture
def root(generated, tmp_path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(generated, tmp_path / "data"))


def _args(root, **kw):
    base = dict(dataset_file="coco_panoptic", coco_path=str(root), coco_panoptic_path=str(root), masks=True,
                num_classes=None, scales=[48], max_size=64, val_size=48, crop_scales=[])
    base.update(kw)
    return Namespace(**base)


def _raw(root, split="val", **kw) -> coco_panoptic.CocoPanoptic:
    dataset = coco_panoptic.build(split, _args(root, **kw))
    dataset.transforms = None  # targets in absolute pixels at the original size
    return dataset


def _panoptic_json(root, split="val") -> Path:
    return root / "annotations" / f"panoptic_{split}2017.json"


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_equal_the_generators_instance_maps(generated, split):
    dataset = _raw(generated, split)
    assert len(dataset) == {"train": 8, "val": 4}[split]
    for index, image_id in enumerate(dataset.ids):
        # the generator draws image `index` of a split from its own seeded generator: redraw it
        rng = np.random.default_rng([SEED, synthetic.SPLIT_IDS[split], index])
        _, instance_map, categories, sky = synthetic._draw_sample(rng, IMAGE_SIZE)
        regions = [instance_map == k for k in range(1, len(categories) + 1)]
        labels = list(categories)
        for category_id, region in ((synthetic.SKY, sky), (synthetic.GROUND, ~sky)):
            region = region & (instance_map == 0)
            if region.any():
                regions.append(region)
                labels.append(category_id)

        img, target = dataset[index]
        h, w = instance_map.shape
        assert img.size == (w, h)
        assert target["image_id"].item() == image_id == synthetic.FIRST_IMAGE_ID[split] + index
        assert target["masks"].dtype == torch.bool
        assert torch.equal(target["masks"], torch.from_numpy(np.stack(regions)))
        assert target["labels"].tolist() == labels
        assert target["area"].tolist() == [float(r.sum()) for r in regions]
        assert target["iscrowd"].tolist() == [0] * len(regions)
        # boxes: masks_to_boxes of each mask, x0 y0 x1 y1 with the last pixel's index as x1 / y1 (as the original)
        for box, region in zip(target["boxes"].tolist(), regions):
            rows, cols = np.nonzero(region)
            assert box == [cols.min(), rows.min(), cols.max(), rows.max()]
        assert target["orig_size"].tolist() == target["size"].tolist() == [h, w]


@pytest.mark.parametrize("masks", [True, False])
def test_boxes_are_masks_to_boxes_of_the_png_as_the_original(tmp_path, masks):
    # an 8x6 image: segment 1 covers columns 2..5 and rows 1..3, segment 2 the rest. The original (and d2's mapper)
    # box a segment with masks_to_boxes: the last pixel's index, [2, 1, 5, 3] (width 3), not the JSON's bbox
    # [2, 1, 4, 3] -> [2, 1, 6, 4]; without --masks too
    (tmp_path / "val2017").mkdir()
    (tmp_path / "png").mkdir()
    PIL.Image.new("RGB", (8, 6), (90, 120, 150)).save(tmp_path / "val2017" / "1.jpg")
    ids = np.full((6, 8), 2, dtype=np.uint8)
    ids[1:4, 2:6] = 1
    PIL.Image.fromarray(np.stack([ids, 0 * ids, 0 * ids], axis=-1)).save(tmp_path / "png" / "1.png")
    segments = [dict(id=1, category_id=1, bbox=[2, 1, 4, 3], area=12, iscrowd=0),
                dict(id=2, category_id=2, bbox=[0, 0, 8, 6], area=36, iscrowd=0)]
    data = dict(images=[dict(id=1, file_name="1.jpg", width=8, height=6)],
                annotations=[dict(image_id=1, file_name="1.png", segments_info=segments)],
                categories=[dict(id=1, name="thing", isthing=1), dict(id=2, name="stuff", isthing=0)])
    (tmp_path / "panoptic.json").write_text(json.dumps(data))
    dataset = coco_panoptic.CocoPanoptic(tmp_path / "val2017", tmp_path / "png", tmp_path / "panoptic.json",
                                         return_masks=masks)
    _, target = dataset[0]
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[2, 1, 5, 3], [0, 0, 7, 5]]
    assert ("masks" in target) == masks
    assert target["area"].tolist() == [12, 36]  # the JSON's, as the original


def test_categories_thing_map_and_detection_api(generated):
    dataset = datasets.build_dataset("val", _args(generated))
    assert datasets.get_is_thing_map(dataset) == {1: True, 2: True, 3: True, 4: False, 5: False}
    assert datasets.get_category_names(dataset) == {1: "ellipse", 2: "rectangle", 3: "triangle", 4: "sky",
                                                   5: "ground"}
    # box / mask AP are computed against the detection annotations of the same images, as in the original
    api = datasets.get_coco_api_from_dataset(torch.utils.data.Subset(dataset, [0, 1]))
    instances = json.loads((generated / "annotations" / "instances_val2017.json").read_text())
    assert sorted(api.anns) == sorted(a["id"] for a in instances["annotations"])
    assert sorted(api.imgs) == dataset.ids
    ann_file, ann_folder = datasets.get_panoptic_files(dataset)
    assert ann_file == _panoptic_json(generated) and ann_folder == generated / "annotations" / "panoptic_val2017"
    with pytest.raises(TypeError, match="not a panoptic dataset"):
        datasets.get_is_thing_map(coco.build("val", Namespace(coco_path=str(generated), dataset_file="coco")))


def test_synthetic_panoptic_dataset_file(generated):
    args = _args(generated, dataset_file="synthetic_panoptic", coco_panoptic_path=None)
    dataset = datasets.build_dataset("train", args)
    assert isinstance(dataset, coco_panoptic.CocoPanoptic) and len(dataset) == 8
    assert datasets.default_num_classes(args) == 6  # max panoptic category id + 1: stuff included


def test_original_layout_png_folder_beside_annotations(root):
    # the original DETR's README layout: <coco_panoptic_path>/panoptic_val2017/ next to annotations/
    (root / "annotations" / "panoptic_val2017").rename(root / "panoptic_val2017")
    dataset = _raw(root)
    assert dataset.ann_folder == root / "panoptic_val2017"
    assert dataset[0][1]["masks"].any()


def test_train_transforms_move_masks_with_the_image(generated):
    random.seed(0)
    torch.manual_seed(0)
    dataset = coco_panoptic.build("train", _args(generated, crop_scales=[40], crop_size=(30, 50)))
    for index in range(len(dataset)):
        img, target = dataset[index]
        n = len(target["labels"])
        assert img.shape[-2:] == target["masks"].shape[-2:] == tuple(target["size"].tolist())
        assert len(target["boxes"]) == len(target["masks"]) == len(target["area"]) == len(target["iscrowd"]) == n
        # (a sliver left by a crop may vanish when the image is then shrunk: the original's transforms, unchanged)


def test_flip_moves_masks_and_boxes_together(generated):
    dataset = _raw(generated)
    img, target = dataset[1]
    _, flipped = T.RandomHorizontalFlip(1.0)(img, target)
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    # the original's hflip maps x to w - x, so a masks_to_boxes box (last pixel's index as x1) lands one pixel to
    # the right of its flipped mask's first column: x0 = w - 1 - x1 + 1
    for box, mask in zip(flipped["boxes"].tolist(), flipped["masks"]):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert box == [cols.min().item() + 1, rows.min().item(), cols.max().item() + 1, rows.max().item()]


def test_stage_one_without_masks_boxes_from_the_png(generated):
    # the box stage returns no masks, but reads the PNG: its boxes are those of the masks (as the original)
    _, target = _raw(generated, masks=False)[0]
    _, with_masks = _raw(generated, masks=True)[0]
    assert "masks" not in target and len(target["boxes"]) == len(target["labels"]) > 0
    assert torch.equal(target["boxes"], with_masks["boxes"])


# ---------------------------------------------------------------------------------------------- errors


def test_png_segment_ids_that_do_not_match_the_json(root):
    data = json.loads(_panoptic_json(root).read_text())
    first = data["annotations"][0]
    old_id = first["segments_info"][0]["id"]
    _edit_json(_panoptic_json(root), lambda d: d["annotations"][0]["segments_info"][0].update(id=12345))
    dataset = _raw(root)
    png = root / "annotations" / "panoptic_val2017" / first["file_name"]
    with pytest.raises(coco.DatasetError, match=r"has no pixel of segment id\(s\) \[12345\]") as e:
        dataset[0]
    assert str(png) in str(e.value)
    # an id in the PNG that the JSON does not list
    _edit_json(_panoptic_json(root), lambda d: d["annotations"][0]["segments_info"].pop(0))
    with pytest.raises(coco.DatasetError, match=rf"segment id\(s\) \[{old_id}\] that .* does not list"):
        _raw(root)[0]


def test_missing_png(root):
    name = json.loads(_panoptic_json(root).read_text())["annotations"][2]["file_name"]
    (root / "annotations" / "panoptic_val2017" / name).unlink()
    dataset = _raw(root)
    with pytest.raises(FileNotFoundError, match=f"panoptic PNG .*{name}"):
        dataset[2]


def test_png_of_another_size(root):
    name = json.loads(_panoptic_json(root).read_text())["annotations"][0]["file_name"]
    png = root / "annotations" / "panoptic_val2017" / name
    PIL.Image.open(png).crop((0, 0, 10, 10)).save(png)
    with pytest.raises(coco.DatasetError, match="is 10x10 but its image"):
        _raw(root)[0]


def test_unknown_category(root):
    _edit_json(_panoptic_json(root), lambda d: d["annotations"][1]["segments_info"][0].update(category_id=77))
    with pytest.raises(coco.DatasetError, match=r"segment id \d+ has category_id 77, which is not in 'categories'"):
        _raw(root)


def test_category_beyond_num_classes(root):
    with pytest.raises(coco.DatasetError, match="category id 5 is outside"):
        _raw(root, num_classes=5)


def test_missing_png_folder_names_both_layouts(root):
    shutil.rmtree(root / "annotations" / "panoptic_val2017")
    with pytest.raises(FileNotFoundError, match="panoptic_val2017 and .*annotations/panoptic_val2017"):
        _raw(root)


def test_missing_flags_and_detection_annotations(root):
    with pytest.raises(ValueError, match="needs --coco_panoptic_path"):
        coco_panoptic.build("val", _args(root, coco_panoptic_path=None))
    (root / "annotations" / "instances_val2017.json").unlink()
    dataset = _raw(root)  # training needs no detection annotations...
    with pytest.raises(FileNotFoundError, match="instances_val2017.json not found"):
        datasets.get_coco_api_from_dataset(dataset)  # ...box AP does


def test_masks_on_a_dataset_without_masks(root):
    # a COCO instances file with boxes only: --masks must stop at build time, naming the file and annotation, and
    # main.py stops there, before building a model or training
    import main

    _edit_json(root / "annotations" / "instances_val2017.json",
               lambda d: [a.pop("segmentation") for a in d["annotations"]])
    coco.build("val", Namespace(coco_path=str(root), dataset_file="coco", masks=False))
    message = r"instances_val2017.json: annotation id \d+ .* has no 'segmentation'"
    with pytest.raises(coco.DatasetError, match=message):
        coco.build("val", Namespace(coco_path=str(root), dataset_file="coco", masks=True))
    with pytest.raises(coco.DatasetError, match=message):
        main.main(main.parse_args(["--dataset_file", "coco", "--coco_path", str(root), "--masks", "--device", "cpu",
                                   "--backbone", "resnet18", "--backbone_weights", "none", "--num_workers", "0"]))
