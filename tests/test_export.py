"""Export (tools.export): ONNX through onnxruntime, torch.export and TorchScript agree with PyTorch on image sizes and
batches not seen at export time, padding mask included."""
import time

import pytest
import torch

from models import build_model
from tools import export as E

from conftest import make_args, tiny_args

LOGITS_ATOL = 1e-4
BOXES_RTOL = 1e-4


def synthetic_model():
    """A tiny model on the synthetic recipe's path: spatial prior (a cross-attention bias), positional encoding at
    the input, layer3, trainable batch norm (eval mode: running statistics)."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(spatial_prior=True, pos_at_input=True, backbone_last_layer="layer3",
                                        backbone_norm="bn", aux_loss=False, val_size=64, max_size=100,
                                        dataset_file="synthetic"))
    return model.eval()


def assert_matches(model, runner) -> list:
    cases = E.check_inputs()
    export_shape = tuple(E.example_inputs()[0].shape)
    assert all(tuple(images.shape) != export_shape for images, _ in cases)
    assert [tuple(images.shape[-2:]) for images, _ in cases] == [(80, 112), (150, 90), (120, 100)]
    assert bool(cases[-1][1].any())  # the batch of two sizes has padding
    wrapper = E.DetrForExport(model).eval()
    for images, mask in cases:
        with torch.no_grad():
            logits, boxes = wrapper(images, mask)
        got_logits, got_boxes = runner(images, mask)
        assert got_logits.shape == logits.shape and got_boxes.shape == boxes.shape
        torch.testing.assert_close(got_logits, logits, atol=LOGITS_ATOL, rtol=0)
        torch.testing.assert_close(got_boxes, boxes, rtol=BOXES_RTOL, atol=0)
    return E.compare(model, runner, cases)


def test_the_padding_mask_matters():
    """The exported signature needs the mask: the same padded pixels without it give other outputs."""
    model = synthetic_model()
    images, mask = E.check_inputs()[-1]
    wrapper = E.DetrForExport(model)
    with torch.no_grad():
        with_mask = wrapper(images, mask)[0]
        without = wrapper(images, torch.zeros_like(mask))[0]
        reference = model(E.NestedTensor(images, mask))["pred_logits"]
    assert (with_mask - without).abs().max() > 1e-3
    torch.testing.assert_close(with_mask, reference, atol=0, rtol=0)  # the wrapper is the model on a NestedTensor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = synthetic_model()
    path = tmp_path_factory.mktemp("export") / "checkpoint.pth"
    args = {k: v for k, v in vars(tiny_args(spatial_prior=True, pos_at_input=True, backbone_last_layer="layer3",
                                            backbone_norm="bn")).items()
            if isinstance(v, (int, float, str, bool, list, type(None)))}
    torch.save({"model": model.state_dict(), "args": args}, path)
    return path


def test_onnx_through_the_command_matches_pytorch_in_onnxruntime(checkpoint, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "detr.onnx"
    report = E.main(["--resume", str(checkpoint), "--format", "onnx", "--output", str(out), "--check"])
    assert len(report) == 3 and all(c["logits_abs"] < LOGITS_ATOL for c in report)
    assert_matches(synthetic_model(), E.load_runner("onnx", str(out)))
    with pytest.raises(SystemExit):  # no silent overwrite
        E.main(["--resume", str(checkpoint), "--format", "onnx", "--output", str(out)])


def test_torch_export_program_matches_pytorch(tmp_path):
    model = synthetic_model()
    path = tmp_path / "detr.pt2"
    E.export(model, "export", str(path))
    assert_matches(model, E.load_runner("export", str(path)))


def test_torchscript_matches_pytorch(tmp_path):
    model = synthetic_model()
    path = tmp_path / "detr.ts"
    E.export(model, "torchscript", str(path))
    assert_matches(model, E.load_runner("torchscript", str(path)))


def test_command_errors(checkpoint, tmp_path, caplog):
    with pytest.raises(SystemExit):
        E.main(["--resume", str(checkpoint), "--format", "export", "--output", str(tmp_path / "detr.bin")])
    assert "must end in .pt2" in caplog.text
    with pytest.raises(SystemExit):
        E.main(["--resume", str(tmp_path / "missing.pth"), "--format", "export", "--output", str(tmp_path / "a.pt2")])
    assert "missing.pth" in caplog.text and "does not exist" in caplog.text
    with pytest.raises(SystemExit):
        E.main(["--resume", str(checkpoint), "--format", "tflite", "--output", str(tmp_path / "a")])


@pytest.mark.slow
def test_onnx_r50_with_random_weights_matches_pytorch(tmp_path):
    """The published architecture (R50, 6 + 6 layers, 100 queries, 91 classes), random weights; about a minute."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model, _, _ = build_model(make_args(num_classes=91, aux_loss=False))
    model.eval()
    path = tmp_path / "detr_r50.onnx"
    start = time.perf_counter()
    E.export(model, "onnx", str(path))
    seconds = time.perf_counter() - start
    report = assert_matches(model, E.load_runner("onnx", str(path)))
    print(f"R50 ONNX export {seconds:.0f}s, {path.stat().st_size / 2 ** 20:.0f} MB; differences {report}")
