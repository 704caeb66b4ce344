import argparse
import json
import logging
import os
from pathlib import Path

import pytest
import torch

import hubconf
from models.loader import PUBLISHED_URLS

from conftest import GOLDEN_DIR

REPO = str(Path(__file__).resolve().parents[1])
ENTRYPOINTS = {
    "detr_resnet50": "detr_resnet50",
    "detr_resnet50_dc5": "detr_resnet50",
    "detr_resnet101": "detr_resnet101",
    "detr_resnet101_dc5": "detr_resnet101",
    "detr_resnet50_panoptic": "detr_resnet50_panoptic",
    "detr_resnet50_dc5_panoptic": "detr_resnet50_panoptic",
    "detr_resnet101_panoptic": "detr_resnet101_panoptic",
}


@pytest.fixture(scope="module")
def layouts():
    path = GOLDEN_DIR / "hub_state_dict_layouts.json"
    if not path.exists():
        pytest.skip(f"golden data {path} is absent")
    return json.loads(path.read_text())


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)

    def no_network(*a, **k):
        raise AssertionError("the test must not download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return cache


def _publish(cache: Path, name: str, model: torch.nn.Module) -> None:
    """A checkpoint shaped like the published ones, holding an argparse.Namespace as they do."""
    filename = os.path.basename(PUBLISHED_URLS[name])
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4, backbone="resnet50")},
               cache / filename)


@pytest.mark.parametrize("name", sorted(ENTRYPOINTS))
def test_state_dict_layout(name, layouts):
    model = getattr(hubconf, name)()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = layouts[ENTRYPOINTS[name]]
    assert list(got) == list(expected)
    assert got == expected


@pytest.mark.parametrize("name", sorted(ENTRYPOINTS))
def test_pretrained_loads_offline_from_the_hub_cache(name, hub_cache):
    torch.manual_seed(0)
    source = getattr(hubconf, name)()
    _publish(hub_cache, name, source)
    model = torch.hub.load(REPO, name, source="local", pretrained=True)
    loaded = model.state_dict()
    for k, v in source.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_postprocessors():
    model, post = hubconf.detr_resnet50(return_postprocessor=True)
    assert not model.aux_loss  # as the original hub models: no aux_outputs
    assert type(post).__name__ == "PostProcess"
    _, post = hubconf.detr_resnet50_panoptic(return_postprocessor=True, threshold=0.5)
    assert type(post).__name__ == "PostProcessPanoptic"
    assert post.threshold == 0.5 and post.is_thing_map[90] and not post.is_thing_map[91]


def test_other_num_classes_reinitialises_only_the_class_head(hub_cache, caplog):
    torch.manual_seed(0)
    source = hubconf.detr_resnet50()
    _publish(hub_cache, "detr_resnet50", source)
    with caplog.at_level(logging.WARNING):
        model = hubconf.detr_resnet50(pretrained=True, num_classes=3)
    assert model.class_embed.weight.shape == (4, 256)
    assert "class_embed.weight" in caplog.text and "class_embed.bias" in caplog.text
    src = source.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("class_embed."):
            assert torch.equal(v, src[k]), k


def test_wrong_checkpoint_names_the_offending_keys(hub_cache):
    torch.manual_seed(0)
    _publish(hub_cache, "detr_resnet50", hubconf.detr_resnet50_panoptic())  # a panoptic model under the box name
    with pytest.raises(ValueError) as err:
        hubconf.detr_resnet50(pretrained=True)
    msg = str(err.value)
    assert "detr-r50-e632da11.pth" in msg
    assert "transformer.encoder.layers.0.self_attn.in_proj_weight (the transformer encoder)" in msg
    assert "segmentation (--masks)" in msg


def _offline(monkeypatch):
    import urllib.error

    def unreachable(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)


def test_offline_pretrained_says_where_to_put_the_file(hub_cache, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(RuntimeError) as err:
        hubconf.detr_resnet50(pretrained=True)
    msg = str(err.value)
    assert "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth could not be downloaded" in msg
    assert str(hub_cache / "detr-r50-e632da11.pth") in msg
    # torch.hub.load cannot take a local path instead: the message says only where the file goes, and its name
    assert "local path" not in msg
    assert "$TORCH_HOME/hub/checkpoints/, under the name detr-r50-e632da11.pth" in msg


def test_offline_resume_url_says_where_to_put_the_file(hub_cache, monkeypatch):
    from util.checkpoint import load_checkpoint

    _offline(monkeypatch)
    url = "https://example.invalid/detr/some-run-0123abcd.pth"
    with pytest.raises(RuntimeError, match=f"could not be downloaded .*put the file at "
                                           f"{hub_cache / 'some-run-0123abcd.pth'}"):
        load_checkpoint(url)
    (hub_cache / "some-run-0123abcd.pth").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match="cached file .*some-run-0123abcd.pth could not be read.*delete it"):
        load_checkpoint(url)
