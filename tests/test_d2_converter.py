"""d2/converter.py: DETR checkpoints -> the Detectron2 wrapper's layout. Pure torch (no Detectron2 needed);
tests/test_d2.py loads the converted checkpoints into the real Detectron2 model."""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN_DIR, tiny_args

from d2 import converter
from d2.flags import NOT_BUILT
from models import build_model
from util.args import get_args_parser

D2_DIR = Path(__file__).resolve().parents[1] / "d2"


@pytest.mark.parametrize("key, expected", [
    ("backbone.0.body.conv1.weight", "detr.backbone.0.backbone.stem.conv1.weight"),
    ("backbone.0.body.bn1.running_var", "detr.backbone.0.backbone.stem.conv1.norm.running_var"),
    ("backbone.0.body.layer1.0.conv3.weight", "detr.backbone.0.backbone.res2.0.conv3.weight"),
    ("backbone.0.body.layer1.2.bn3.bias", "detr.backbone.0.backbone.res2.2.conv3.norm.bias"),
    ("backbone.0.body.layer2.0.downsample.0.weight", "detr.backbone.0.backbone.res3.0.shortcut.weight"),
    ("backbone.0.body.layer4.0.downsample.1.running_mean",
     "detr.backbone.0.backbone.res5.0.shortcut.norm.running_mean"),
    ("backbone.0.body.layer3.22.bn2.weight", "detr.backbone.0.backbone.res4.22.conv2.norm.weight"),
    ("transformer.decoder.layers.5.multihead_attn.in_proj_weight",
     "detr.transformer.decoder.layers.5.multihead_attn.in_proj_weight"),
    ("query_embed.weight", "detr.query_embed.weight"),
    ("class_embed.bias", "detr.class_embed.bias"),
    # a segmentation model (DETRsegm) holds the box model as .detr
    ("detr.backbone.0.body.layer3.1.bn1.weight", "detr.detr.backbone.0.backbone.res4.1.conv1.norm.weight"),
    ("detr.input_proj.weight", "detr.detr.input_proj.weight"),
    ("mask_head.lay1.weight", "detr.mask_head.lay1.weight"),
    ("bbox_attention.q_linear.weight", "detr.bbox_attention.q_linear.weight"),
])
def test_rename_key(key, expected):
    assert converter.rename_key(key) == expected


def test_unknown_backbone_module_is_refused():
    with pytest.raises(converter.ConversionError, match="backbone.0.body.layer1.0.se.fc1.weight"):
        converter.rename_key("backbone.0.body.layer1.0.se.fc1.weight")


def test_coco_ids():
    assert len(converter.COCO_DETECTION_IDS) == 80 and converter.COCO_DETECTION_IDS[-1] == 90
    assert 12 not in converter.COCO_DETECTION_IDS and 83 not in converter.COCO_DETECTION_IDS
    assert len(converter.COCO_PANOPTIC_IDS) == 133 == len(set(converter.COCO_PANOPTIC_IDS))
    assert converter.COCO_PANOPTIC_IDS == sorted(converter.COCO_PANOPTIC_IDS)


def _head(rows: int, dim: int = 3) -> dict:
    # row i holds the value i, so the selected rows can be read off
    return {"class_embed.weight": torch.arange(rows, dtype=torch.float32)[:, None].repeat(1, dim),
            "class_embed.bias": torch.arange(rows, dtype=torch.float32)}


def test_coco_head_keeps_the_80_categories_then_no_object():
    state, ids = converter.convert_state_dict(_head(92))
    assert ids == converter.COCO_DETECTION_IDS
    assert state["detr.class_embed.bias"].tolist() == converter.COCO_DETECTION_IDS + [91]
    assert state["detr.class_embed.weight"].shape == (81, 3)
    assert state["detr.class_embed.weight"][:, 0].tolist() == converter.COCO_DETECTION_IDS + [91]


def test_panoptic_head_keeps_the_133_categories_then_no_object():
    head = {"detr." + k: v for k, v in _head(251).items()}
    state, ids = converter.convert_state_dict(head)
    assert state["detr.detr.class_embed.bias"].tolist() == converter.COCO_PANOPTIC_IDS + [250]


def test_categories_from_a_coco_file_and_a_list(tmp_path):
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [], "annotations": [],
                               "categories": [{"id": 3, "name": "c"}, {"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    state, ids = converter.convert_state_dict(_head(5), str(ann))
    assert ids == [1, 2, 3]  # Detectron2 numbers categories by increasing id
    assert state["detr.class_embed.bias"].tolist() == [1, 2, 3, 4]
    state, _ = converter.convert_state_dict(_head(5), "3,1")
    assert state["detr.class_embed.bias"].tolist() == [1, 3, 4]
    state, ids = converter.convert_state_dict(_head(5), "keep")
    assert ids is None and state["detr.class_embed.bias"].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("spec, message", [
    ("auto", "class head has 5 rows"),
    ("1,4", r"must lie in \[0, 4\)"),
    ("1,1", "distinct"),
    ("ellipse", "expected auto, coco"),
])
def test_bad_categories_are_explained(spec, message):
    with pytest.raises(converter.ConversionError, match=message):
        converter.convert_state_dict(_head(5), spec)


def test_spatial_prior_checkpoints_are_refused():
    state = {**_head(92), "reference_points": torch.zeros(4, 2)}
    with pytest.raises(converter.ConversionError, match="spatial prior"):
        converter.convert_state_dict(state)


@pytest.mark.parametrize("args, named", [
    ({"pos_at_input": True}, "--pos_at_input True"),
    ({"spatial_prior": True}, "--spatial_prior True"),
    ({"query_groups": 4}, "--query_groups 4"),
    ({"backbone_blocks": 1}, "--backbone_blocks 1"),
    ({"backbone_last_layer": "layer3"}, "--backbone_last_layer layer3"),
    ({"backbone_norm": "bn"}, "--backbone_norm bn"),
])
def test_checkpoints_of_flags_the_wrapper_does_not_build_are_refused(tmp_path, args, named):
    """The checkpoint's args say how it was trained: a flag the Detectron2 model cannot build is named, with its
    value, and nothing is written."""
    src, out = tmp_path / "ckpt.pth", tmp_path / "out.pth"
    torch.save({"model": _head(92), "args": {**vars(get_args_parser().parse_args([])), **args}}, src)
    with pytest.raises(SystemExit, match=re.escape(named)):
        converter.main(["--source_model", str(src), "--output_model", str(out)])
    assert not out.exists()


def test_refused_flags_are_main_py_flags():
    # a renamed flag would otherwise never be found in a checkpoint's args, and never refused
    assert set(NOT_BUILT) <= set(vars(get_args_parser().parse_args([])))


@pytest.mark.parametrize("args", [
    "defaults",  # this repository's checkpoint of a default main.py run: vars(args), every flag at its default
    "original",  # the original's: an argparse.Namespace of its own flags, none of the ones refused above
    "train_backbone_stem",  # a training aid: the weights have the published layout
])
def test_checkpoints_of_the_published_architecture_convert(tmp_path, args):
    if args == "defaults":
        ckpt_args = vars(get_args_parser().parse_args([]))
    elif args == "original":
        ckpt_args = argparse.Namespace(lr=1e-4, lr_backbone=1e-5, batch_size=2, backbone="resnet50", dilation=False,
                                       position_embedding="sine", enc_layers=6, dec_layers=6, hidden_dim=256,
                                       num_queries=100, pre_norm=False, masks=False, aux_loss=True,
                                       dataset_file="coco", frozen_weights=None, device="cuda")
    else:
        ckpt_args = {**vars(get_args_parser().parse_args([])), "train_backbone_stem": True}
    src, out = tmp_path / "ckpt.pth", tmp_path / "out.pth"
    torch.save({"model": _head(92), "args": ckpt_args}, src)
    converter.main(["--source_model", str(src), "--output_model", str(out)])
    assert torch.load(out, weights_only=True)["model"]["detr.class_embed.bias"].shape == (81,)


def test_converter_runs_as_a_file_from_inside_d2(tmp_path):
    """The original's command: cd d2 && python converter.py --source_model ... --output_model ..."""
    model, _, _ = build_model(tiny_args(num_classes=4))
    src = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict(), "args": {"num_classes": 4}}, src)
    proc = subprocess.run([sys.executable, "converter.py", "--source_model", str(src),
                           "--output_model", str(tmp_path / "converted.pth"), "--categories", "1,2,3"],
                          cwd=D2_DIR, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = torch.load(tmp_path / "converted.pth", weights_only=True)["model"]
    assert set(state) == {converter.rename_key(k) for k in model.state_dict()}


@pytest.mark.parametrize("layout", ["detr_resnet50", "detr_resnet101", "detr_resnet50_panoptic",
                                    "detr_resnet101_panoptic"])
def test_published_layouts_convert(layout):
    path = GOLDEN_DIR / "hub_state_dict_layouts.json"
    if not path.exists():
        pytest.skip(f"golden data {path} is absent (it ships only beside the project's own checkout)")
    layouts = json.loads(path.read_text())
    shapes = layouts[layout] if isinstance(layouts[layout], dict) else dict(layouts[layout])
    state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    out, ids = converter.convert_state_dict(state)
    assert len(out) == len(state)
    backbone = [k for k in out if ".backbone." in k]
    assert len(backbone) == sum(".body." in k for k in state)
    assert all(re.search(r"\.backbone\.0\.backbone\.(stem|res[2-5]\.\d+)\.(conv[1-3]|shortcut)(\.norm)?\.", k)
               for k in backbone), backbone
    assert all(k.startswith("detr.") for k in out)
    head = next(v for k, v in out.items() if k.endswith("class_embed.weight"))
    assert head.shape[0] == (134 if "panoptic" in layout else 81)


def test_cli_converts_a_checkpoint_from_the_hub_cache(tmp_path, monkeypatch):
    """A URL is read through the torch hub cache: a file already there is used without the network."""
    model, _, _ = build_model(tiny_args(num_classes=4))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "tiny-detr.pth"
    cached.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "args": {"num_classes": 4}}, cached)
    out = tmp_path / "out" / "tiny_d2.pth"
    converter.main(["--source_model", "https://dl.fbaipublicfiles.com/detr/tiny-detr.pth",
                    "--output_model", str(out), "--categories", "1,2,3"])
    converted = torch.load(out, weights_only=True)
    assert converted["detr_conversion"]["category_ids"] == [1, 2, 3]
    state = converted["model"]
    assert set(state) == {converter.rename_key(k) for k in model.state_dict()}
    torch.testing.assert_close(state["detr.backbone.0.backbone.res3.0.shortcut.weight"],
                               model.state_dict()["backbone.0.body.layer2.0.downsample.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(state["detr.class_embed.weight"], model.class_embed.weight[[1, 2, 3, 4]],
                               rtol=0, atol=0)


def test_cli_errors_name_the_problem(tmp_path):
    model, _, _ = build_model(tiny_args(num_classes=4))
    src = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict()}, src)
    with pytest.raises(SystemExit, match="class head has 5 rows"):
        converter.main(["--source_model", str(src), "--output_model", str(tmp_path / "out.pth")])
    with pytest.raises(SystemExit, match="does not exist"):
        converter.main(["--source_model", str(tmp_path / "missing.pth"), "--output_model", str(tmp_path / "o.pth")])
    assert not (tmp_path / "out.pth").exists()
