import pytest
import torch

from models import build_model
from models.backbone import load_backbone_weights
from typing import List

from torch import Tensor, nn

from util.misc import nested_tensor_from_tensor_list

from conftest import load_golden, make_args, tiny_args

ATOL = 1e-4


def golden_model():
    g = load_golden("tiny_detr.pth")
    cfg = dict(g["config"])
    model, criterion, post = build_model(make_args(**cfg))
    model.load_state_dict(g["checkpoint"]["model"], strict=True)
    model.eval()
    return g, model, criterion, post


def test_golden_outputs_including_aux():
    g, model, _, _ = golden_model()
    with torch.no_grad():
        out = model(g["images"])
    ref = g["outputs"]
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], atol=ATOL, rtol=0)
    assert len(out["aux_outputs"]) == len(ref["aux_outputs"]) == g["config"]["dec_layers"] - 1
    for a, b in zip(out["aux_outputs"], ref["aux_outputs"]):
        torch.testing.assert_close(a["pred_logits"], b["pred_logits"], atol=ATOL, rtol=0)
        torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], atol=ATOL, rtol=0)


def test_golden_postprocess():
    g, model, _, post = golden_model()
    with torch.no_grad():
        results = post["bbox"](model(g["images"]), g["postprocess"]["target_sizes"])
    for r, ref in zip(results, g["postprocess"]["results"]):
        assert torch.equal(r["labels"], ref["labels"])
        torch.testing.assert_close(r["scores"], ref["scores"], atol=ATOL, rtol=0)
        # boxes are in pixels (up to ~130 here): 1e-4 absolute on normalised boxes, scaled
        torch.testing.assert_close(r["boxes"], ref["boxes"], atol=ATOL * 2, rtol=1e-5)


def test_input_types_give_the_same_output():
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args())
    model.eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    with torch.no_grad():
        from_list = model(images)
        from_batch = model(torch.stack(images))
        from_nested = model(nested_tensor_from_tensor_list(images))
    for out in (from_batch, from_nested):
        torch.testing.assert_close(out["pred_boxes"], from_list["pred_boxes"])
        torch.testing.assert_close(out["pred_logits"], from_list["pred_logits"])


def test_output_shapes():
    model, _, _ = build_model(tiny_args(num_queries=7, num_classes=3))
    out = model([torch.rand(3, 50, 70), torch.rand(3, 64, 40)])
    assert out["pred_logits"].shape == (2, 7, 4)
    assert out["pred_boxes"].shape == (2, 7, 4)
    assert len(out["aux_outputs"]) == 1
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    model, _, _ = build_model(tiny_args(aux_loss=False))
    assert "aux_outputs" not in model([torch.rand(3, 32, 32)])


def _frozen_and_trainable(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return trainable, frozen


def test_exactly_the_original_parameters_are_trainable():
    model, _, _ = build_model(tiny_args())
    trainable, frozen = _frozen_and_trainable(model)
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith("backbone.0.body.") and not n.startswith(
                          ("backbone.0.body.layer2", "backbone.0.body.layer3", "backbone.0.body.layer4"))}
    assert "backbone.0.body.conv1.weight" in frozen
    assert any(n.startswith("backbone.0.body.layer1.") for n in frozen)
    assert "backbone.0.body.layer2.0.conv1.weight" in trainable
    # frozen batch norm has no parameters at all, only buffers
    assert not any(".bn" in n for n in trainable | frozen)
    # lr_backbone 0: nothing in the backbone trains
    model, _, _ = build_model(tiny_args(lr_backbone=0.0))
    trainable, _ = _frozen_and_trainable(model)
    assert not any(n.startswith("backbone.") for n in trainable)


def test_every_trainable_parameter_gets_a_finite_gradient():
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(aux_loss=True))
    model.train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [{"labels": torch.tensor([0, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.7, 0.3, 0.4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    losses = criterion(model(images), targets)
    loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


def test_convergence_aids_are_off_by_default_and_train_when_on():
    model, _, _ = build_model(tiny_args())
    assert not any("reference_points" in k or "prior_log_sigma" in k for k in model.state_dict())
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(spatial_prior=True, pos_at_input=True, backbone_norm="bn",
                                                train_backbone_stem=True, backbone_last_layer="layer3"))
    assert model.backbone.num_channels == 256
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.2]])}]
    losses = criterion(model([torch.rand(3, 64, 64)]), targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    for name, p in model.named_parameters():
        assert p.requires_grad, name
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_dc5_and_learned_position_embedding_build():
    model, _, _ = build_model(tiny_args(backbone="resnet50", dilation=True, position_embedding="learned",
                                        enc_layers=1, dec_layers=1))
    out = model([torch.rand(3, 64, 64)])
    assert out["pred_boxes"].shape == (1, 5, 4)


def test_building_never_downloads(monkeypatch, tmp_path):
    def no_download(*a, **k):
        raise AssertionError("building a model must not download")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: any weights would have to be downloaded
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)  # what torchvision's weights call
    build_model(tiny_args(backbone_weights="imagenet"))
    build_model(tiny_args(backbone="resnet50", masks=True, hidden_dim=128, nheads=8))


def test_imagenet_weights_missing_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    model, _, _ = build_model(tiny_args())
    with pytest.raises(RuntimeError) as err:
        load_backbone_weights(model.backbone[0], "imagenet")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "--backbone_weights none" in msg and "--backbone_weights PATH" in msg


def test_corrupt_cached_imagenet_weights_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(b"truncated")
    model, _, _ = build_model(tiny_args())
    with pytest.raises(RuntimeError, match=r"cached file .*resnet18-f37072fd.pth could not be read.*delete it"):
        load_backbone_weights(model.backbone[0], "imagenet")


def test_backbone_weights_from_cache_and_from_path(monkeypatch, tmp_path):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    state = reference.state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / "resnet18-f37072fd.pth")
    model, _, _ = build_model(tiny_args())
    backbone = model.backbone[0]
    assert load_backbone_weights(backbone, "imagenet") == str(cache / "resnet18-f37072fd.pth")
    assert torch.equal(backbone.body.conv1.weight, state["conv1.weight"])
    assert torch.equal(backbone.body.layer1[0].bn1.running_var, state["layer1.0.bn1.running_var"])

    path = tmp_path / "r18.pth"
    torch.save({"model": torchvision.models.resnet18(weights=None).state_dict()}, path)
    load_backbone_weights(backbone, str(path))
    with pytest.raises(ValueError, match="not a resnet18 state dict"):
        torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
        load_backbone_weights(backbone, str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_backbone_weights(backbone, str(tmp_path / "nope.pth"))


def test_any_torchvision_resnet_is_a_backbone():
    from models.backbone import Backbone

    for name, channels in (("resnext50_32x4d", 2048), ("wide_resnet50_2", 2048), ("resnet34", 512)):
        backbone = Backbone(name, train_backbone=True, return_interm_layers=False, dilation=False)
        assert backbone.num_channels == channels, name
        out = backbone(nested_tensor_from_tensor_list([torch.rand(3, 64, 64)]))
        assert out["0"].tensors.shape[1] == channels
    with pytest.raises(ValueError, match="'vgg16' is not a torchvision ResNet; expected one of .*resnext50_32x4d"):
        Backbone("vgg16", train_backbone=True, return_interm_layers=False, dilation=False)


def test_backbone_blocks_keeps_the_first_blocks_of_each_stage_and_loads_full_resnet_weights(tmp_path):
    import torchvision

    from models.backbone import Backbone

    full = Backbone("resnet18", train_backbone=True, return_interm_layers=False, dilation=False)
    short = Backbone("resnet18", train_backbone=True, return_interm_layers=False, dilation=False, blocks=1)
    for i in range(1, 5):
        assert len(getattr(full.body, f"layer{i}")) == 2 and len(getattr(short.body, f"layer{i}")) == 1
    short_keys = set(short.body.state_dict())
    assert short_keys < set(full.body.state_dict())
    assert not any(k.startswith("layer1.1.") for k in short_keys)
    assert short.num_channels == 512
    x = nested_tensor_from_tensor_list([torch.rand(3, 64, 96)])
    assert short(x)["0"].tensors.shape == full(x)["0"].tensors.shape == (1, 512, 2, 3)
    # the full ResNet's (e.g. ImageNet) weights load into the shorter trunk: the kept blocks get theirs
    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    load_backbone_weights(short, str(tmp_path / "r18.pth"))
    assert torch.equal(short.body.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    with pytest.raises(ValueError, match="blocks must be >= 0"):
        Backbone("resnet18", train_backbone=True, return_interm_layers=False, dilation=False, blocks=-1)


def test_backbone_blocks_is_an_architecture_flag():
    from models import loader

    model, _, _ = build_model(tiny_args(backbone_blocks=1))
    assert not any(".layer1.1." in k for k in model.state_dict())
    differences = loader.architecture_differences({"backbone_blocks": 1}, tiny_args(backbone_blocks=0))
    assert any("--backbone_blocks: checkpoint 1, this run 0" in d for d in differences)


def test_query_groups_is_an_architecture_flag(tmp_path):
    # --frozen_weights of a Group-DETR box model under a run without --query_groups: the error names the flag
    from models import loader
    from util.checkpoint import save_checkpoint

    box_args = tiny_args(query_groups=2, hidden_dim=128, nheads=8)
    box, _, _ = build_model(box_args)
    save_checkpoint({"model": box.state_dict(), "args": vars(box_args)}, str(tmp_path / "box.pth"))
    args = tiny_args(hidden_dim=128, nheads=8, masks=True, frozen_weights=str(tmp_path / "box.pth"))
    model, _, _ = build_model(args)
    with pytest.raises(ValueError, match="--query_groups: checkpoint 2, this run 1"):
        loader.load_frozen_box_model(args, model)


def test_imagenet_weights_of_every_resnet_are_known():
    from models.backbone import _imagenet_url, resnet_names

    assert _imagenet_url("wide_resnet50_2").endswith("wide_resnet50_2-95faca4d.pth")
    for name in resnet_names():
        assert _imagenet_url(name).startswith("https://download.pytorch.org/models/"), name


def test_spatial_prior_is_its_own_module_with_the_old_state_dict_keys():
    from models.spatial_prior import SpatialPrior

    model, _, _ = build_model(tiny_args(spatial_prior=True))
    assert isinstance(model.spatial_prior, SpatialPrior)
    keys = list(model.state_dict())
    assert "reference_points" in keys and "prior_log_sigma" in keys
    assert not any(k.startswith("spatial_prior.") for k in keys)
    # a checkpoint written with those keys loads strictly, into DETRsegm too
    other, _, _ = build_model(tiny_args(spatial_prior=True))
    other.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(other.spatial_prior.reference_points, model.spatial_prior.reference_points)
    segm, _, _ = build_model(tiny_args(spatial_prior=True, masks=True, hidden_dim=128, nheads=8))
    assert "detr.reference_points" in segm.state_dict()
    segm.load_state_dict(segm.state_dict(), strict=True)
    plain, _, _ = build_model(tiny_args())
    assert plain.spatial_prior is None


@pytest.mark.parametrize("dataset_file, flags, class_outputs", [
    ("coco", [], 92),
    ("coco_panoptic", ["--masks", "--hidden_dim", "128", "--nheads", "8"], 251),
])
def test_build_model_derives_num_classes_of_known_datasets(dataset_file, flags, class_outputs):
    """The original's scripts call build_model on the parser's output without --num_classes: 91 classes for coco,
    250 for coco_panoptic (+1 for no-object), and a panoptic post-processor for coco_panoptic."""
    from main import get_args_parser

    args = get_args_parser().parse_args(["--dataset_file", dataset_file, "--backbone", "resnet18",
                                         "--backbone_weights", "none", "--device", "cpu", "--hidden_dim", "32",
                                         "--nheads", "4", "--enc_layers", "1", "--dec_layers", "1",
                                         "--dim_feedforward", "64", "--num_queries", "5", *flags])
    assert args.num_classes is None
    model, criterion, postprocessors = build_model(args)
    detr = model.detr if args.masks else model
    assert detr.class_embed.out_features == class_outputs
    assert criterion.num_classes == class_outputs - 1
    assert ("panoptic" in postprocessors) == (dataset_file == "coco_panoptic")
    if dataset_file == "coco_panoptic":  # ids up to 90 are things, as the original's post-processor
        is_thing_map = postprocessors["panoptic"].is_thing_map
        assert is_thing_map[1] and is_thing_map[90] and not is_thing_map[92] and not is_thing_map[200]


def test_known_class_counts_are_one_table():
    import datasets
    from util.args import KNOWN_NUM_CLASSES

    assert datasets.NUM_CLASSES is KNOWN_NUM_CLASSES
    assert KNOWN_NUM_CLASSES == {"coco": 91, "coco_panoptic": 250}


def test_models_do_not_import_datasets():
    import subprocess
    import sys

    code = "import sys, models, hubconf; sys.exit(int(any(m.split('.')[0] == 'datasets' for m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert result.returncode == 0, "models/ or hubconf.py imported datasets/"


def _two_images():
    torch.manual_seed(1)
    return nested_tensor_from_tensor_list([torch.rand(3, 96, 128), torch.rand(3, 112, 80)])


def _assert_scripted_equal(model, samples):
    import warnings

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in recent torch
        scripted = torch.jit.script(model)
    with torch.no_grad():
        eager, script = model(samples), scripted(samples)
    assert eager.keys() == script.keys()
    for k, v in eager.items():
        if k == "aux_outputs":
            for a, b in zip(v, script[k]):
                for kk in a:
                    assert torch.equal(a[kk], b[kk]), (k, kk)
        else:
            assert torch.equal(v, script[k]), k


@pytest.mark.parametrize("overrides", [
    {},
    dict(spatial_prior=True, pos_at_input=True, backbone_norm="bn", train_backbone_stem=True,
         backbone_last_layer="layer3"),
    dict(position_embedding="learned", pre_norm=True, aux_loss=False),
    dict(masks=True, hidden_dim=128, nheads=8, spatial_prior=True),
])
def test_scripted_model_equals_eager(overrides):
    """The one equality test of the scripted model: the hub entrypoints build through build_model too (R50 and
    panoptic differ only in depth and flags covered here)."""
    model, _, _ = build_model(tiny_args(**overrides))
    _assert_scripted_equal(model, _two_images())


class Wrapped(nn.Module):
    """A user's module, as in the original's tests: it batches a list of images itself."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: List[Tensor]):
        return self.model(nested_tensor_from_tensor_list(inputs))


def test_a_users_scripted_wrapper_batching_a_list_of_images_equals_eager():
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(enc_layers=1, dec_layers=1))
    torch.manual_seed(1)
    _assert_scripted_equal(Wrapped(model), [torch.rand(3, 96, 128), torch.rand(3, 112, 80)])


def test_scripted_parts_equal_eager():
    import warnings

    from models.backbone import Backbone, Joiner
    from models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine

    samples = _two_images()
    backbone = Backbone("resnet18", True, True, False).eval()
    parts = [backbone, PositionEmbeddingSine(32, normalize=True), PositionEmbeddingLearned(32),
             Joiner(backbone, PositionEmbeddingSine(32, normalize=True)).eval()]
    for part in parts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.script(part)
        with torch.no_grad():
            x = samples
            if isinstance(part, (PositionEmbeddingSine, PositionEmbeddingLearned)):
                x = backbone(samples)["0"]
            eager, script = part(x), scripted(x)
        if isinstance(eager, dict):
            for k in eager:
                assert torch.equal(eager[k].tensors, script[k].tensors) and torch.equal(eager[k].mask, script[k].mask)
        elif isinstance(eager, tuple):
            for a, b in zip(eager[0], script[0]):
                assert torch.equal(a.tensors, b.tensors)
            for a, b in zip(eager[1], script[1]):
                assert torch.equal(a, b)
        else:
            assert torch.equal(eager, script)


def test_attention_weights_on_request_only():
    from models.transformer import capture_attention

    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(aux_loss=False))
    model.eval()
    samples = _two_images()
    with torch.no_grad():
        fused = model(samples)
        with capture_attention(model.transformer) as attention:
            explicit = model(samples)
        after = model(samples)
    torch.testing.assert_close(explicit["pred_logits"], fused["pred_logits"], atol=1e-5, rtol=0)
    assert torch.equal(after["pred_logits"], fused["pred_logits"])
    assert all(not layer.need_weights for layer in model.transformer.decoder.layers)
    h, w = (-(-n // 32) for n in samples.tensors.shape[-2:])  # the stride-32 feature map
    cross = attention["decoder.1.cross_attn"]
    assert cross.shape == (2, 5, h * w) and attention["encoder.0.self_attn"].shape == (2, h * w, h * w)
    torch.testing.assert_close(cross.sum(-1), torch.ones(2, 5))
    # padded keys of the narrower second image get no attention
    mask = torch.nn.functional.interpolate(samples.mask[None].float(), size=(h, w))[0].bool().flatten(1)
    assert mask[1].any() and cross[1][:, mask[1]].abs().max() == 0


@pytest.mark.parametrize("overrides", [dict(backbone="resnet18"), dict(backbone="resnet50", dilation=True, masks=True,
                                                                       hidden_dim=128, nheads=8)])
def test_folded_frozen_batch_norm_and_channels_last_equal_the_plain_trunk(overrides):
    import copy

    from models.backbone import _ConvFrozenBN, unfold_frozen_batch_norms

    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(**overrides))
    for name, buffer in model.named_buffers():  # frozen statistics far from the identity
        if "running_var" in name:
            buffer.uniform_(0.5, 2.0)
        elif "running_mean" in name or name.endswith(".bias"):
            buffer.normal_(0, 0.2)
    model.eval()
    backbone = (model.detr if overrides.get("masks") else model).backbone[0]
    assert backbone.folded and backbone.channels_last
    assert any(isinstance(m, _ConvFrozenBN) for m in model.modules())
    plain = copy.deepcopy(model)
    unfold_frozen_batch_norms(plain)
    for m in plain.modules():
        if hasattr(m, "channels_last"):
            m.channels_last = False
    assert not any(isinstance(m, _ConvFrozenBN) for m in plain.modules())
    assert list(plain.state_dict()) == list(model.state_dict())  # the checkpoint layout is unchanged
    samples = _two_images()
    with torch.no_grad():
        fast, reference = model(samples), plain(samples)
    for k in reference:
        if torch.is_tensor(reference[k]):
            torch.testing.assert_close(fast[k], reference[k], atol=1e-5, rtol=0)
    # and in training, with gradients to the trained convolutions: exact up to rounding, which fp32 amplifies
    # through a 50-layer random trunk (about 1e-3 of a gradient's norm), so compared in float64
    model.double().train()
    plain.double().train()
    samples = type(samples)(samples.tensors.double(), samples.mask)
    for m in (model, plain):
        out = m(samples)
        (out["pred_boxes"].sum() + out["pred_logits"].logsumexp(-1).sum()).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-8, msg=name)


def test_query_groups_train_every_group_and_infer_with_the_first():
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(query_groups=3, spatial_prior=True))
    assert model.query_embed.weight.shape == (15, 32)
    samples = _two_images()
    targets = [{"labels": torch.tensor([0, 3]), "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .7, .3, .4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[.5, .5, .5, .5]])}]
    model.train()
    out = model(samples)
    assert len(out["group_outputs"]) == 2 and out["pred_logits"].shape == (2, 5, 5)
    losses = criterion(out, targets)
    # the average over the groups of each group's own losses
    per_group = [criterion({k: v for k, v in out.items() if k != "group_outputs"}, targets)]
    per_group += [criterion(g, targets) for g in out["group_outputs"]]
    for k in ("loss_ce", "loss_bbox", "loss_giou_0"):
        torch.testing.assert_close(losses[k], sum(p[k] for p in per_group) / 3)
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    assert model.query_embed.weight.grad[5:].abs().sum() > 0  # the extra groups' queries learn
    # the first group alone equals a model without the extra queries (they attend within their group only)
    single, _, _ = build_model(tiny_args(spatial_prior=True))
    state = model.state_dict()
    state["query_embed.weight"] = state["query_embed.weight"][:5]
    single.load_state_dict(state)
    single.train()
    torch.testing.assert_close(single(samples)["pred_boxes"], out["pred_boxes"], atol=1e-5, rtol=0)
    model.eval()
    assert "group_outputs" not in model(samples)
    _assert_scripted_equal(model, samples)
