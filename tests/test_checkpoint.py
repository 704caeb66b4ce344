import argparse
import os

import pytest
import torch

from models import build_model
from util.checkpoint import (atomic_write, checkpoint_paths, component_of, load_checkpoint, load_model_state,
                              save_checkpoint)

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


def test_written_files_get_the_umask_permissions_and_reach_the_disk(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else None)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    old_umask = os.umask(0o022)
    try:
        save_checkpoint({"model": {}}, str(tmp_path / "a.pth"))
        os.umask(0o002)
        save_checkpoint({"model": {}}, str(tmp_path / "b.pth"))
    finally:
        os.umask(old_umask)
    assert oct(os.stat(tmp_path / "a.pth").st_mode & 0o777) == oct(0o644)  # group and others may read
    assert oct(os.stat(tmp_path / "b.pth").st_mode & 0o777) == oct(0o664)
    # per file: the data first, then the folder holding the rename
    assert synced[:2] == [False, True] and len(synced) == 4


def test_atomic_write_without_fsync_still_leaves_no_partial_file(tmp_path, monkeypatch):
    def no_fsync(fd):
        raise AssertionError("durable=False must not fsync")

    monkeypatch.setattr(os, "fsync", no_fsync)
    path = tmp_path / "out" / "a.png"
    with atomic_write(str(path), durable=False) as f:
        f.write(b"png")
    assert path.read_bytes() == b"png"
    with pytest.raises(RuntimeError), atomic_write(str(path), durable=False) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"png" and os.listdir(path.parent) == ["a.png"]  # no temporary file left


def test_save_on_master_writes_atomically_on_the_main_process(tmp_path):
    from util.misc import save_on_master

    save_on_master({"model": {"w": torch.ones(1)}}, tmp_path / "x.pth")
    assert torch.load(tmp_path / "x.pth", weights_only=True)["model"]["w"].item() == 1.0
    assert os.listdir(tmp_path) == ["x.pth"]


def test_resuming_from_a_file_still_being_written_is_refused(tmp_path):
    tmp = tmp_path / ".checkpoint.pth.1234.abcd1234.tmp"
    tmp.write_bytes(b"partial")
    with pytest.raises(ValueError, match=r"temporary file that another process is still writing.*checkpoint.pth"):
        load_checkpoint(str(tmp))


def test_checkpoint_names_before_the_lr_drop_and_every_100_epochs(tmp_path):
    names = {e: [p.name for p in checkpoint_paths(tmp_path, e, lr_drop=4)] for e in (0, 3, 7, 99, 150)}
    assert names == {0: ["checkpoint.pth"], 3: ["checkpoint.pth", "checkpoint0003.pth"],
                     7: ["checkpoint.pth", "checkpoint0007.pth"], 99: ["checkpoint.pth", "checkpoint0099.pth"],
                     150: ["checkpoint.pth"]}
