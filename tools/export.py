"""Export a DETR for deployment: ONNX, torch.export (.pt2) or TorchScript, with dynamic batch and image size.

    python -m tools.export --resume runs/synthetic/checkpoint.pth --format onnx --output detr.onnx --check
    python -m tools.export --hub detr_resnet50 --format export --output detr_r50.pt2
    python -m tools.export --resume checkpoint.pth --format torchscript --output detr.ts

Every format has one signature, padding mask included so that a batch of images of different sizes runs as in
evaluation:

    inputs:  images [B, 3, H, W] float32: each image resized as evaluation does (short side 800, long side at most
                    1333 for the published models), normalised with ImageNet's mean/std, and padded at the bottom
                    and right to the batch's size; H and W at least 64
             mask   [B, H, W] bool: True on padding
    outputs: logits [B, num_queries, num_classes + 1] (the last class is "no object")
             boxes  [B, num_queries, 4] (cx, cy, w, h) normalised by each image's unpadded size

(``tools.inference`` does the same pre- and post-processing: softmax over the classes, drop the last, scale the boxes.)
Only the box model is exported; the mask head of a segmentation model is not.

``--check`` runs the exported model (ONNX through onnxruntime) on two image sizes and a padded batch of two sizes,
none of them used at export time, and compares with PyTorch (at most 1e-4 apart).
ONNX export needs ``onnxscript`` (it brings ``onnx``): torch's exporter goes through torch.export, then onnxscript.
"""
import argparse
import contextlib
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from models.segmentation import DETRsegm
from util.checkpoint import atomic_write
from util.nested_tensor import NestedTensor, nested_tensor_from_tensor_list

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "export", "torchscript")
INPUT_NAMES = ["images", "mask"]
OUTPUT_NAMES = ["logits", "boxes"]
MIN_SIDE = 64  # the backbone's feature map is then at least 2 x 2 (torch.export specialises sizes 0 and 1)
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """A missing optional dependency (onnxscript, onnxruntime)."""


class DetrForExport(nn.Module):
    """(images [B, 3, H, W], mask [B, H, W] True on padding) -> (logits, boxes): DETR with plain tensors in and out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, DETRsegm):
            logger.info("exporting the box model of the segmentation model (the mask head is not exported)")
            model = model.detr
        self.model = model

    def forward(self, images: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        out = self.model(NestedTensor(images, mask))
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        # the output dict's values are Any in TorchScript: refined to tensors
        assert isinstance(logits, Tensor) and isinstance(boxes, Tensor)
        return logits, boxes


def example_inputs(height: int = 96, width: int = 128, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """A padded batch of two images of different sizes (the second smaller in both directions), so that the traced
    model sees real padding: (images [2, 3, height, width], mask [2, height, width])."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, height, width, generator=generator),
              torch.randn(3, height * 3 // 4, width * 5 // 6, generator=generator)]
    batch = nested_tensor_from_tensor_list(images)
    return batch.tensors, batch.mask


def check_inputs(seed: int = 1) -> List[Tuple[Tensor, Tensor]]:
    """Inputs none of which has the shape of ``example_inputs``: two single images of other sizes and a padded batch
    of two other sizes."""
    generator = torch.Generator().manual_seed(seed)
    cases = [[(80, 112)], [(150, 90)], [(70, 100), (120, 64)]]
    out = []
    for sizes in cases:
        batch = nested_tensor_from_tensor_list([torch.randn(3, h, w, generator=generator) for h, w in sizes])
        out.append((batch.tensors, batch.mask))
    return out


def dynamic_shapes() -> Dict[str, Dict[int, torch.export.Dim]]:
    batch = torch.export.Dim("batch", min=1)
    height = torch.export.Dim("height", min=MIN_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE)
    return {"images": {0: batch, 2: height, 3: width}, "mask": {0: batch, 1: height, 2: width}}


def export_program(model: nn.Module) -> torch.export.ExportedProgram:
    """``torch.export`` of the box model, batch size and image size dynamic."""
    wrapper = DetrForExport(model).eval()
    with torch.no_grad():
        return torch.export.export(wrapper, example_inputs(), dynamic_shapes=dynamic_shapes())


@contextlib.contextmanager
def _quiet_onnx_exporter():
    """The exporter's chatter: onnxscript's optimizer logs a warning per multi-output node it does not fold, and the
    dynamic-shape renaming warns that the mask shares the images' axes (it does, by design)."""
    noisy = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [n.level for n in noisy]
    for n in noisy:
        n.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            yield
    finally:
        for n, level in zip(noisy, levels):
            n.setLevel(level)


def export_onnx(model: nn.Module, path: str, opset: Optional[int] = None) -> None:
    """ONNX file at ``path`` (one file, weights inside), batch size and image size dynamic."""
    if importlib.util.find_spec("onnxscript") is None:
        raise ExportError("ONNX export needs onnxscript (torch's exporter translates torch.export's graph with it): "
                           "pip install onnxscript")
    program = export_program(model)
    detr = model.detr if isinstance(model, DETRsegm) else model
    if getattr(detr, "spatial_prior", None) is not None:
        # With a float attn_mask (the spatial prior's cross-attention bias), torch 2.14's ONNX exporter loses the
        # .contiguous() that nn.MultiheadAttention puts between its output's permute and .view(tgt_len * bsz,
        # embed_dim), and fails ("Cannot view a tensor with shape [Q, B, nheads, head_dim] ..."), static batch
        # or not. Decomposing the program to core ATen ops first keeps the copy (same outputs, within 1e-6).
        program = program.run_decompositions()
    with _quiet_onnx_exporter():
        onnx_program = torch.onnx.export(program, example_inputs(), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                                         dynamic_shapes=dynamic_shapes(), opset_version=opset, dynamo=True,
                                         external_data=False, verbose=False)
    with atomic_write(path) as f:  # onnx writes by name: into atomic_write's temporary file, renamed when complete
        onnx_program.save(f.name, external_data=False)


def export_torchscript(model: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript of the box model (``torch.jit.script``; deprecated by torch in favour of torch.export, kept
    while the installed torch supports it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated.*", category=FutureWarning)
        return torch.jit.script(DetrForExport(model).eval())


def export(model: nn.Module, fmt: str, path: str, opset: Optional[int] = None) -> None:
    """Write ``model`` in format ``fmt`` ('onnx', 'export' (a torch.export .pt2 archive) or 'torchscript') to
    ``path`` (a complete file or none)."""
    model = model.eval()
    if fmt == "onnx":
        export_onnx(model, path, opset)
    elif fmt == "export":
        program = export_program(model)
        with atomic_write(path) as f:
            torch.export.save(program, f)
    elif fmt == "torchscript":
        scripted = export_torchscript(model)
        with atomic_write(path) as f, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.save.*deprecated.*", category=FutureWarning)
            torch.jit.save(scripted, f)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def load_runner(fmt: str, path: str):
    """A callable (images, mask) -> (logits, boxes) as tensors, running the exported file."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise ExportError("checking an ONNX file needs onnxruntime: pip install onnxruntime") from None
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

        def run_onnx(images: Tensor, mask: Tensor) -> Tuple[Tensor, ...]:
            outputs = session.run(OUTPUT_NAMES, {"images": images.numpy(), "mask": mask.numpy()})
            return tuple(torch.from_numpy(o) for o in outputs)
        return run_onnx
    if fmt == "export":
        module = torch.export.load(path).module()
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated.*", category=FutureWarning)
            module = torch.jit.load(path)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")

    def run_module(images: Tensor, mask: Tensor) -> Tuple[Tensor, ...]:
        with torch.no_grad():
            return tuple(module(images, mask))
    return run_module


def compare(model: nn.Module, runner, cases: Optional[List[Tuple[Tensor, Tensor]]] = None) -> List[Dict[str, float]]:
    """Per case: the largest absolute difference of the logits and the largest relative difference of the boxes
    between PyTorch and ``runner``."""
    wrapper = DetrForExport(model).eval()
    report = []
    for images, mask in cases or check_inputs():
        with torch.no_grad():
            logits, boxes = wrapper(images, mask)
        got_logits, got_boxes = runner(images, mask)
        report.append({
            "shape": list(images.shape),
            "logits_abs": float((got_logits - logits).abs().max()),
            "boxes_rel": float(((got_boxes - boxes).abs() / boxes.abs().clamp(min=1e-12)).max()),
        })
    return report


def get_args_parser() -> argparse.ArgumentParser:
    from tools.inference import add_model_arguments

    parser = argparse.ArgumentParser("python -m tools.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, "export")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx, export (torch.export .pt2 archive) or torchscript")
    parser.add_argument("--output", required=True, help="file to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's)")
    parser.add_argument("--check", action="store_true",
                        help="compare the exported model with PyTorch on inputs of sizes not used at export")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


def main(argv: Optional[List[str]] = None) -> List[Dict[str, float]]:
    from models.loader import load_model
    from util.logger import setup_logging

    setup_logging()
    args = get_args_parser().parse_args(argv)
    if args.format == "export" and not args.output.endswith(".pt2"):
        logger.error("--output %s: a torch.export archive must end in .pt2 (torch.export.load reads only those)",
                     args.output)
        raise SystemExit(1)
    if Path(args.output).exists() and not args.overwrite:
        logger.error("%s exists: pass --overwrite to replace it", args.output)
        raise SystemExit(1)
    try:
        model = load_model(args.hub or args.resume, device="cpu").model
        export(model, args.format, args.output, args.opset)
        logger.info("wrote %s (%s, %.1f MB)", args.output, args.format, os.path.getsize(args.output) / 2 ** 20)
        report = compare(model, load_runner(args.format, args.output)) if args.check else []
    except (FileNotFoundError, ValueError, ExportError) as err:  # bad input or a missing package: the message says it
        logger.error("%s", err)
        raise SystemExit(1) from None
    for case in report:
        logger.info("check %s: logits at most %.2g apart, boxes %.2g (relative)", case["shape"], case["logits_abs"],
                    case["boxes_rel"])
    if any(c["logits_abs"] > TOLERANCE or c["boxes_rel"] > TOLERANCE for c in report):
        logger.error("the exported model differs from PyTorch by more than %g", TOLERANCE)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
