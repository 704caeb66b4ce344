import argparse
import os

import pytest
import torch

from models import build_model
from util.checkpoint import component_of, load_checkpoint, load_model_state, save_checkpoint

from conftest import tiny_args


def test_save_is_atomic_and_plain(tmp_path, monkeypatch):
    path = tmp_path / "out" / "checkpoint.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 3, "args": {"lr": 1e-4}}, str(path))
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert os.listdir(path.parent) == ["checkpoint.pth"]

    def broken_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"model": {}}, str(path))
    assert os.listdir(path.parent) == ["checkpoint.pth"]  # the old file intact, no temp left
    assert load_checkpoint(str(path))["epoch"] == 3


def test_old_checkpoints_with_a_namespace_load(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1e-4, epochs=300)}, path)
    ckpt = load_checkpoint(str(path))
    assert ckpt["args"] == {"lr": 1e-4, "epochs": 300}


def test_unreadable_and_missing_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pth.*could not be read"):
        load_checkpoint(str(tmp_path / "junk.pth"))
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="expected a dict with a 'model' state dict"):
        load_checkpoint(str(tmp_path / "other.pth"))


def test_mismatch_lists_keys_and_components():
    model, _, _ = build_model(tiny_args())
    other, _, _ = build_model(tiny_args(num_classes=7, dec_layers=1))
    with pytest.raises(ValueError) as err:
        load_model_state(model, other.state_dict(), source="other.pth")
    msg = str(err.value)
    assert "checkpoint other.pth does not fit the model" in msg
    assert "transformer.decoder.layers.1.self_attn.in_proj_weight (the transformer decoder)" in msg
    assert "shape of class_embed.weight (the class head): checkpoint [8, 32], model [5, 32]" in msg
    assert "--finetune" in msg


def test_finetune_reinitialises_the_class_head_only():
    model, _, _ = build_model(tiny_args())
    other, _, _ = build_model(tiny_args(num_classes=7))
    before = model.class_embed.weight.clone()
    skipped = load_model_state(model, other.state_dict(), source="other.pth", reinit_class_head=True)
    assert skipped == ["class_embed.weight", "class_embed.bias"]
    assert torch.equal(model.class_embed.weight, before)
    assert torch.equal(model.query_embed.weight, other.query_embed.weight)


def test_component_names():
    assert component_of("detr.mask_head.lay1.weight") == "the segmentation head"
    assert component_of("backbone.0.body.layer4.0.conv1.weight") == "the backbone"
    assert component_of("query_embed.weight") == "the object queries"
