"""Your own data, end to end: a COCO-format dataset in a layout of its own (not COCO's), trained on with explicit
paths, then its checkpoint evaluated on an annotation file with ``--eval --resume CKPT --val_json X --val_images Y``.

The data is a handful of the synthetic images, converted: the images in ``imgs/`` (both splits in one folder, under
new names), the annotations in ``ann/{train,val}.json`` with sparse category ids 3, 7, 12 and names of their own."""
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import main as detr_main
from datasets.synthetic import generate

# synthetic category id -> this dataset's (sparse) id and name
REMAP = {1: (3, "oval"), 2: (7, "box"), 3: (12, "wedge")}
NAMES = {new_id: name for new_id, name in REMAP.values()}
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--enc_layers", "1", "--dec_layers", "1",
        "--dim_feedforward", "64", "--num_queries", "5", "--dropout", "0", "--batch_size", "2", "--num_workers", "0",
        "--epochs", "1", "--lr_drop", "5", "--scales", "64", "--max_size", "80", "--val_size", "64", "--crop_scales",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def custom_data(tmp_path_factory) -> Path:
    """<root>/imgs/{train,val}_N.jpg and <root>/ann/{train,val}.json: not the COCO layout, ids 3, 7, 12."""
    source = generate(tmp_path_factory.mktemp("synthetic") / "data", seed=1, num_train=4, num_val=2, image_size=64)
    root = tmp_path_factory.mktemp("custom")
    (root / "imgs").mkdir()
    (root / "ann").mkdir()
    for split in ("train", "val"):
        data = json.loads((source / "annotations" / f"instances_{split}2017.json").read_text())
        for img in data["images"]:
            new_name = f"{split}_{img['id']}.jpg"
            shutil.copy(source / f"{split}2017" / img["file_name"], root / "imgs" / new_name)
            img["file_name"] = new_name
        for ann in data["annotations"]:
            ann["category_id"] = REMAP[ann["category_id"]][0]
        # plus a centred box of half the image's size, where an untrained DETR's boxes start (sigmoid(0) = 0.5): so
        # that one epoch already scores an AP above 0, and comparing the two evaluations' APs is not comparing zeros
        next_id = max(ann["id"] for ann in data["annotations"]) + 1
        for k, img in enumerate(data["images"]):
            x, y, w, h = img["width"] / 4, img["height"] / 4, img["width"] / 2, img["height"] / 2
            data["annotations"].append({"id": next_id + k, "image_id": img["id"], "category_id": 12, "iscrowd": 0,
                                        "bbox": [x, y, w, h], "area": w * h,
                                        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        data["categories"] = [{"id": i, "name": n, "supercategory": "shape"} for i, n in REMAP.values()]
        (root / "ann" / f"{split}.json").write_text(json.dumps(data))
    return root


def _paths(root: Path, splits=("train", "val")) -> list[str]:
    argv = []
    for split in splits:
        argv += [f"--{split}_json", str(root / "ann" / f"{split}.json"), f"--{split}_images", str(root / "imgs")]
    return argv


def _train_then_evaluate(root: Path, out: Path, model_flags: list[str], caplog) -> tuple[dict, dict, dict]:
    """Train one epoch with the explicit paths into ``out``; then --eval --resume its checkpoint on the val JSON.
    Returns (the training's last log line, the checkpoint, the evaluation's stats)."""
    with caplog.at_level(logging.INFO):
        detr_main.main(detr_main.parse_args(["--dataset_file", "coco", "--output_dir", str(out)] + _paths(root)
                                            + TINY + model_flags))
    train_json = root / "ann" / "train.json"
    assert f"number of classes: 13 (max category id 12 + 1, from {train_json})" in caplog.text
    logged = json.loads((out / "log.txt").read_text().splitlines()[-1])
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)

    # the checkpoint alone, on an annotation file: architecture, size and classes come from the checkpoint
    evaluated = detr_main.main(detr_main.parse_args(
        ["--eval", "--resume", str(out / "checkpoint.pth"), "--batch_size", "2", "--num_workers", "0",
         "--device", "cpu"] + _paths(root, splits=("val",)) + [f for f in model_flags if f == "--masks"]))
    return logged, checkpoint, evaluated


def test_train_and_evaluate_on_a_custom_layout(custom_data, tmp_path, caplog):
    logged, checkpoint, evaluated = _train_then_evaluate(
        custom_data, tmp_path, ["--hidden_dim", "32", "--nheads", "4"], caplog)
    assert checkpoint["args"]["num_classes"] == 13
    assert checkpoint["model"]["class_embed.bias"].shape == (14,)  # 13 classes (ids 0..12) + no-object
    assert checkpoint["args"]["category_names"] == NAMES  # for the predictor (tools/inference.py) and the plots
    assert checkpoint["args"]["train_json"] == str(custom_data / "ann" / "train.json")
    # --eval --resume on the same val JSON gives the numbers the training logged
    assert len(evaluated["coco_eval_bbox"]) == 12
    assert logged["test_coco_eval_bbox"][0] > 0  # thanks to the centred boxes (see custom_data)
    assert evaluated["coco_eval_bbox"] == pytest.approx(logged["test_coco_eval_bbox"], abs=1e-6)
    assert evaluated["loss"] == pytest.approx(logged["test_loss"], rel=1e-5)


def test_mask_model_gets_box_and_mask_ap(custom_data, tmp_path, caplog):
    # the mask head's GroupNorm(8) layers need hidden_dim a multiple of 128 and 8 heads
    logged, checkpoint, evaluated = _train_then_evaluate(
        custom_data, tmp_path, ["--hidden_dim", "128", "--nheads", "8", "--masks"], caplog)
    assert checkpoint["args"]["category_names"] == NAMES and checkpoint["args"]["num_classes"] == 13
    for key in ("coco_eval_bbox", "coco_eval_masks"):
        assert evaluated[key] == pytest.approx(logged[f"test_{key}"], abs=1e-6)
    assert evaluated["loss"] == pytest.approx(logged["test_loss"], rel=1e-5)


def test_finetune_keeps_the_architecture_and_the_class_head_only_for_the_same_categories(custom_data, tmp_path,
                                                                                        caplog):
    source = tmp_path / "source"
    detr_main.main(detr_main.parse_args(["--dataset_file", "coco", "--output_dir", str(source)] + _paths(custom_data)
                                        + TINY + ["--hidden_dim", "32", "--nheads", "4"]))
    trained = torch.load(source / "checkpoint.pth", weights_only=True)["model"]
    # the same images and ids under other names: the class head's rows would be the wrong categories
    renamed = tmp_path / "renamed"
    (renamed / "ann").mkdir(parents=True)
    for split in ("train", "val"):
        data = json.loads((custom_data / "ann" / f"{split}.json").read_text())
        data["categories"] = [{**c, "name": c["name"].upper()} for c in data["categories"]]
        (renamed / "ann" / f"{split}.json").write_text(json.dumps(data))
    paths = [f for split in ("train", "val") for f in (f"--{split}_json", str(renamed / "ann" / f"{split}.json"),
                                                       f"--{split}_images", str(custom_data / "imgs"))]
    # no architecture flag given: they are the checkpoint's (--num_classes: this dataset's)
    training = ["--batch_size", "2", "--num_workers", "0", "--epochs", "1", "--lr", "0", "--lr_backbone", "0",
                "--scales", "64", "--max_size", "80", "--val_size", "64", "--crop_scales", "--device", "cpu"]
    for data_paths, out in [(paths, tmp_path / "renamed_run"), (_paths(custom_data), tmp_path / "same_run")]:
        with caplog.at_level(logging.INFO):
            detr_main.main(detr_main.parse_args(["--dataset_file", "coco", "--output_dir", str(out), "--finetune",
                                                 str(source / "checkpoint.pth")] + data_paths + training))
    assert (f"Fine-tuning from {source / 'checkpoint.pth'}: its architecture for the flags you did not set: "
            f"--backbone resnet18") in caplog.text
    renamed_run = torch.load(tmp_path / "renamed_run" / "checkpoint.pth", weights_only=True)
    same_run = torch.load(tmp_path / "same_run" / "checkpoint.pth", weights_only=True)
    for ckpt in (renamed_run, same_run):
        assert (ckpt["args"]["hidden_dim"], ckpt["args"]["num_queries"], ckpt["args"]["num_classes"]) == (32, 5, 13)
        # lr 0: the weights are the ones loaded (or initialised)
        assert torch.equal(ckpt["model"]["query_embed.weight"], trained["query_embed.weight"])
    assert not torch.equal(renamed_run["model"]["class_embed.weight"], trained["class_embed.weight"])
    assert torch.equal(same_run["model"]["class_embed.weight"], trained["class_embed.weight"])
    assert ("initialised: the class head (14 rows: 13 classes + no-object; the checkpoint's 14 rows are 3 categories: "
            "3 oval, 7 box, 12 wedge; this dataset's are 3 categories: 3 OVAL, 7 BOX, 12 WEDGE)") in caplog.text
    assert "class head: the checkpoint's categories are this dataset's, 3 categories: 3 oval, 7 box, 12 wedge); " \
           "initialised: nothing" in caplog.text
