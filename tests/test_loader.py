"""models.loader: from a checkpoint (path, URL in the hub cache, or hub name) to a model, and the architecture a
checkpoint was trained with."""
import argparse
import logging
import os

import pytest
import torch

from datasets import recipes
from models import build_model
from datasets.coco_categories import COCO_CATEGORY_NAMES
from models.loader import (PUBLISHED_URLS, checkpoint_flags, load_finetune_weights, load_model,
                           read_finetune_checkpoint, take_checkpoint_flags, take_finetune_flags)
from util import args as arguments
from util.checkpoint import save_checkpoint

from conftest import tiny_args


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)

    def no_network(*a, **k):
        raise AssertionError("the test must not download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return cache


def _images():
    torch.manual_seed(1)
    return [torch.rand(3, 48, 64), torch.rand(3, 40, 56)]


def test_checkpoint_flags_of_the_originals_checkpoints():
    import argparse

    # the original's Namespace: none of our new flags, no num_classes (the class head says 91)
    original = argparse.Namespace(backbone="resnet50", dilation=True, position_embedding="sine", hidden_dim=256,
                                  nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=2048, pre_norm=False,
                                  num_queries=100, masks=False, lr=1e-4)
    flags = checkpoint_flags({"model": {"class_embed.bias": torch.zeros(92)}, "args": vars(original)})
    assert flags["backbone"] == "resnet50" and flags["dilation"] is True and flags["num_classes"] == 91
    assert flags["backbone_norm"] == "frozen_bn" and flags["backbone_last_layer"] == "layer4"
    assert flags["backbone_blocks"] == 0 and flags["pos_at_input"] is False and flags["spatial_prior"] is False
    assert flags["val_size"] == 800 and flags["max_size"] == 1333
    # on the synthetic recipe's defaults, the checkpoint wins over the recipe for every flag not given
    args = arguments.parse_args(["--dataset_file", "synthetic", "--eval", "--resume", "detr-r50-dc5.pth"])
    recipes.apply_dataset_recipe(args)
    take_checkpoint_flags(args, {"model": {"class_embed.bias": torch.zeros(92)}, "args": vars(original)})
    assert (args.backbone, args.hidden_dim, args.backbone_norm, args.val_size) == ("resnet50", 256, "frozen_bn", 800)
    assert "backbone" not in args.defaults_applied and args.checkpoint_applied["backbone"] == "resnet50"



def test_a_checkpoint_without_args_records_only_its_class_count():
    # e.g. written by hand or by another tool: no run to take flags from, nothing to conflict with the given ones
    bare = {"model": {"class_embed.bias": torch.zeros(5)}, "args": {}}
    assert checkpoint_flags(bare) == {"num_classes": 4}
    args = arguments.parse_args(["--eval", "--resume", "bare.pth", "--backbone", "resnet18", "--hidden_dim", "64"])
    recipes.apply_dataset_recipe(args)
    assert take_checkpoint_flags(args, bare) == {"num_classes": 4}
    assert (args.backbone, args.hidden_dim, args.num_classes) == ("resnet18", 64, 4)

def test_a_checkpoint_of_this_project_loads_with_its_args_and_categories(tmp_path):
    torch.manual_seed(0)
    args = tiny_args(val_size=96, max_size=160)
    args.category_names = {1: "circle", 2: "square", 3: "triangle"}
    model, _, _ = build_model(args)
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "args": vars(args)}, str(path))

    loaded = load_model(str(path), device="cpu")
    assert not loaded.model.training and not loaded.model.aux_loss
    assert set(loaded.postprocessors) == {"bbox"}
    assert loaded.category_names == {1: "circle", 2: "square", 3: "triangle"}
    assert loaded.thing_ids is None and loaded.published is None
    assert (loaded.args["val_size"], loaded.args["max_size"], loaded.args["num_classes"]) == (96, 160, 4)
    model.eval()
    with torch.no_grad():
        expected, got = model(_images()), loaded.model(_images())
    assert torch.equal(expected["pred_logits"], got["pred_logits"])
    assert torch.equal(expected["pred_boxes"], got["pred_boxes"])


def test_the_originals_checkpoint_gets_its_class_count_from_the_class_head(tmp_path):
    # an argparse.Namespace without this project's flags nor num_classes, under a published file name
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(num_classes=7))
    path = tmp_path / os.path.basename(PUBLISHED_URLS["detr_resnet50"])
    original = argparse.Namespace(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                                  dim_feedforward=64, num_queries=5, dataset_file="coco", masks=False, lr=1e-4,
                                  device="cuda", frozen_weights=None)
    torch.save({"model": model.state_dict(), "args": original}, path)
    loaded = load_model(str(path), device="cpu")
    assert loaded.model.class_embed.out_features == 8 and loaded.args["num_classes"] == 7
    assert loaded.published == "detr_resnet50" and loaded.category_names is None
    assert loaded.args["dataset_file"] == "coco" and loaded.args["val_size"] == 800
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k


def test_a_mask_model_gets_its_thing_ids_and_a_panoptic_postprocessor(tmp_path):
    torch.manual_seed(0)
    args = tiny_args(masks=True, hidden_dim=128, nheads=8, dataset_file="synthetic_panoptic", panoptic_threshold=0.5)
    args.thing_ids, args.category_names = [3, 1, 2], {1: "a", 2: "b", 3: "c", 4: "sky"}
    model, _, _ = build_model(args)
    args.frozen_weights = "box/checkpoint.pth"  # as stage two records it: the loaded model is not frozen
    save_checkpoint({"model": model.state_dict(), "args": vars(args)}, str(tmp_path / "segm.pth"))
    loaded = load_model(str(tmp_path / "segm.pth"), device="cpu")
    assert set(loaded.postprocessors) == {"bbox", "segm", "panoptic"}
    assert loaded.thing_ids == [1, 2, 3]
    assert loaded.postprocessors["panoptic"].threshold == 0.5
    assert loaded.postprocessors["panoptic"].is_thing_map == {1: True, 2: True, 3: True, 4: False}
    assert all(p.requires_grad for p in loaded.model.detr.transformer.parameters())


def test_overrides_another_class_count_reinitialises_the_head_and_other_architectures_fail(tmp_path, caplog):
    torch.manual_seed(0)
    args = tiny_args()
    model, _, _ = build_model(args)
    save_checkpoint({"model": model.state_dict(), "args": vars(args)}, str(tmp_path / "c.pth"))
    with caplog.at_level(logging.WARNING):
        loaded = load_model(str(tmp_path / "c.pth"), device="cpu", overrides={"num_classes": 2})
    assert loaded.model.class_embed.out_features == 3 and "class_embed.weight" in caplog.text
    assert torch.equal(loaded.model.bbox_embed.layers[0].weight, model.bbox_embed.layers[0].weight)
    with pytest.raises(ValueError, match="--hidden_dim: checkpoint 32, this run 64"):
        load_model(str(tmp_path / "c.pth"), device="cpu", overrides={"hidden_dim": 64})


def test_hub_names_and_urls_load_through_the_hub_cache(hub_cache, tmp_path):
    torch.manual_seed(0)
    args = tiny_args()
    model, _, _ = build_model(args)
    url = "https://example.invalid/detr/some-run-0123abcd.pth"
    save_checkpoint({"model": model.state_dict(), "args": vars(args)}, str(hub_cache / "some-run-0123abcd.pth"))
    loaded = load_model(url, device="cpu")
    assert torch.equal(loaded.model.class_embed.weight, model.class_embed.weight) and loaded.published is None

    panoptic = load_model("detr_resnet50_panoptic", device="cpu", pretrained=False)
    assert panoptic.published == "detr_resnet50_panoptic" and panoptic.thing_ids == list(range(91))
    assert panoptic.args["num_classes"] == 250 and panoptic.args["backbone"] == "resnet50"
    assert set(panoptic.postprocessors) == {"bbox", "segm", "panoptic"}
    with pytest.raises(RuntimeError, match="could not be downloaded"):
        load_model("detr_resnet101_dc5", device="cpu")  # not in the cache, offline


def test_unknown_names_and_missing_files_are_said():
    with pytest.raises(ValueError, match="unknown hub model 'detr_resnet18'"):
        load_model("detr_resnet18")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("runs/nope/checkpoint.pth")


def test_hub_names_without_overrides_get_their_datasets_class_count():
    # the box models' table entries name no dataset: the parser's default, coco, gives 91 classes (as hubconf's)
    box = load_model("detr_resnet50", device="cpu", pretrained=False)
    assert box.args["num_classes"] == 91 and box.model.class_embed.out_features == 92 and box.thing_ids is None


def test_finetune_from_a_hub_name_takes_the_published_architecture(hub_cache, caplog):
    # the published checkpoint's file in the cache (a stand-in: a hub name's flags are the PUBLISHED table's)
    fake = {"model": {"class_embed.bias": torch.zeros(92)}, "args": argparse.Namespace(lr=1e-4, backbone="resnet50")}
    torch.save(fake, hub_cache / os.path.basename(PUBLISHED_URLS["detr_resnet50_dc5"]))
    coco = {1: "person", 2: "bicycle"}
    checkpoint = read_finetune_checkpoint("detr_resnet50_dc5", {"coco": coco})
    assert checkpoint["args"]["category_names"] == coco  # the caller's COCO names: the original's args have none
    # on the synthetic recipe's small model: every architecture flag not given becomes the published R50-DC5's
    args = arguments.parse_args(["--dataset_file", "synthetic", "--finetune", "detr_resnet50_dc5"])
    recipes.apply_dataset_recipe(args)
    with caplog.at_level(logging.INFO):
        applied = take_finetune_flags(args, checkpoint)
    assert (args.backbone, args.dilation, args.hidden_dim, args.num_queries) == ("resnet50", True, 256, 100)
    assert (args.backbone_norm, args.backbone_last_layer, args.spatial_prior) == ("frozen_bn", "layer4", False)
    assert "backbone" not in args.defaults_applied and applied["hidden_dim"] == 256
    assert args.num_classes is None and args.val_size == 128  # this dataset's classes and images
    assert "Fine-tuning from detr_resnet50_dc5: its architecture for the flags you did not set: " in caplog.text
    assert "--backbone resnet50 --dilation" in caplog.text
    # a given architecture flag against the checkpoint's is an error naming it
    args = arguments.parse_args(["--finetune", "detr_resnet50_dc5", "--num_queries", "50"])
    with pytest.raises(ValueError) as err:
        take_finetune_flags(args, checkpoint)
    assert "--finetune detr_resnet50_dc5 was trained with other architecture flags" in str(err.value)
    assert "--num_queries: checkpoint 100, this run 50" in str(err.value)
    assert "another --num_queries needs new object queries" in str(err.value)
    with pytest.raises(ValueError, match="unknown hub model 'detr_resnet18'"):
        read_finetune_checkpoint("detr_resnet18")
    with pytest.raises(RuntimeError, match="could not be downloaded"):
        read_finetune_checkpoint("detr_resnet101")  # not in the cache, offline


def _finetune_onto(checkpoint: dict, category_names: dict, **flags):
    """A fresh tiny model for a dataset with ``category_names``, fine-tuned from ``checkpoint``."""
    torch.manual_seed(1)
    args = tiny_args(**flags)
    args.finetune, args.category_names = "source.pth", category_names
    model, _, _ = build_model(args)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    initialised = load_finetune_weights(model, checkpoint, args)
    return model, fresh, initialised


def test_finetune_keeps_the_class_head_only_for_the_same_categories(tmp_path, caplog):
    torch.manual_seed(0)
    args = tiny_args()  # 4 classes: ids 1..3 and the unused 0
    args.category_names = {1: "circle", 2: "square", 3: "triangle"}
    source, _, _ = build_model(args)
    checkpoint = {"model": source.state_dict(), "args": vars(args)}
    caplog.set_level(logging.INFO)

    # the same ids and names (keys as str: a checkpoint whose args went through JSON): everything loads
    model, _, initialised = _finetune_onto(checkpoint, {"1": "circle", "2": "square", "3": "triangle"})
    assert initialised == [] and torch.equal(model.class_embed.weight, source.class_embed.weight)
    assert "initialised: nothing" in caplog.text and "class head: the checkpoint's categories are" in caplog.text

    # the same ids and rows, other names (a dataset with ids 1..K under COCO's person, bicycle, ...): re-initialised
    caplog.clear()
    model, fresh, initialised = _finetune_onto(checkpoint, {1: "cat", 2: "dog", 3: "bird"})
    assert initialised == ["class_embed.weight", "class_embed.bias"]
    assert torch.equal(model.class_embed.weight, fresh["class_embed.weight"])
    for k, v in source.state_dict().items():
        if not k.startswith("class_embed."):
            assert torch.equal(model.state_dict()[k], v), k
    n = len(source.state_dict()) - 2
    assert (f"Fine-tuning from source.pth: loaded {n} tensors (backbone, input projection, transformer encoder, "
            f"transformer decoder, object queries, box head); initialised: the class head (5 rows: 4 classes + "
            f"no-object; the checkpoint's 5 rows are 3 categories: 1 circle, 2 square, 3 triangle; this dataset's "
            f"are 3 categories: 1 cat, 2 dog, 3 bird)") in caplog.text

    # the same names under other ids, another class count, a checkpoint recording no categories: re-initialised
    for names, flags in [({2: "circle", 3: "square", 4: "triangle"}, {"num_classes": 5}),
                         ({3: "circle", 7: "square", 12: "triangle"}, {"num_classes": 13})]:
        assert _finetune_onto(checkpoint, names, **flags)[2] == ["class_embed.weight", "class_embed.bias"]
    unnamed = {**checkpoint, "args": {k: v for k, v in vars(args).items() if k != "category_names"}}
    caplog.clear()
    assert _finetune_onto(unnamed, args.category_names)[2] == ["class_embed.weight", "class_embed.bias"]
    assert "no-object; the checkpoint records no categories)" in caplog.text

    # any other difference is an error naming the flags
    with pytest.raises(ValueError, match="--finetune source.pth was trained with another architecture.*\n"
                                         "  --hidden_dim: checkpoint 32, this run 64"):
        _finetune_onto(checkpoint, args.category_names, hidden_dim=64, nheads=4)


def test_finetune_from_a_published_file_knows_its_categories_are_cocos(tmp_path, caplog):
    # the original's args (a Namespace without categories), under a published file name: its classes are COCO's
    torch.manual_seed(0)
    args = tiny_args(num_classes=91)
    source, _, _ = build_model(args)
    path = tmp_path / os.path.basename(PUBLISHED_URLS["detr_resnet50"])
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(**vars(args))}, path)
    checkpoint = read_finetune_checkpoint(str(path), {"coco": COCO_CATEGORY_NAMES})
    assert checkpoint["args"]["category_names"] == COCO_CATEGORY_NAMES
    # fine-tuning COCO on COCO keeps the class head
    model, _, initialised = _finetune_onto(checkpoint, COCO_CATEGORY_NAMES, num_classes=91)
    assert initialised == [] and torch.equal(model.class_embed.weight, source.class_embed.weight)
    # ids 1..90 of other categories do not inherit COCO's rows
    caplog.set_level(logging.INFO)
    model, fresh, initialised = _finetune_onto(checkpoint, {i: f"part{i}" for i in range(1, 91)}, num_classes=91)
    assert initialised and torch.equal(model.class_embed.weight, fresh["class_embed.weight"])
    assert ("the checkpoint's 92 rows are 80 categories: 1 person, 2 bicycle, 3 car, 4 motorcycle, 5 airplane, ...; "
            "this dataset's are 90 categories: 1 part1") in caplog.text
