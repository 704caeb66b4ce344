"""models.loader: from a checkpoint (path, URL in the hub cache, or hub name) to a model, and the architecture a
checkpoint was trained with."""
import argparse
import logging
import os

import pytest
import torch

from datasets import recipes
from models import build_model
from models.loader import PUBLISHED_URLS, checkpoint_flags, load_model, take_checkpoint_flags
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
