"""The speed rows of ``tools.gpu_check`` (``speed.py``), measured in a process of their own for one DETR checkout.

    python tools/gpu_check/speed_worker.py '{"repo": "/path/to/detr", "device": "cuda", ...}'

Run once for this repository and, with ``--reference PATH``, once for a checkout of the original
facebookresearch/detr: both have top-level packages ``models`` and ``util``, so each is imported in a fresh process
with only its own root on ``sys.path`` (this file imports nothing of ours, and nothing but the standard library and
torch before that). Each row is printed as one line ``GPU_CHECK_ROW {json}`` as soon as it is measured, so a run
stopped by its timeout still reports what it measured. ``correctness.py`` takes its inputs from here too.

Rows: inference of the R50 hub model (``hubconf.detr_resnet50``, random weights, eval) in fp32 (TF32 off), TF32,
bf16 autocast and bf16 autocast + ``--compile`` (``util.compile.CompiledOrEager``, this repository only; measured
last, since compiling takes longest); a training step (forward, losses, backward, AdamW step; train mode, frozen
batch norm) in fp32 (TF32 off) and bf16 autocast. ``"model": "tiny"``: a resnet18 / hidden 32 model (``--smoke``).
Times are means over ``iters`` calls after ``warmup`` calls, synchronised; peak memory is
``torch.cuda.max_memory_allocated`` from a reset before each row's first call (weights included).
"""
import contextlib
import json
import sys
import time
import traceback

TINY = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=64,
            num_queries=10)


def emit(row: dict) -> None:
    print("GPU_CHECK_ROW " + json.dumps(row), flush=True)


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for CUDA matmuls and cuDNN convolutions on or off. Through the legacy flags: torch (2.9+) refuses to read
    them once its newer ``fp32_precision`` settings were used, and code that reads them (ours, torch's own, a
    user's) keeps working this way; torch keeps the ``fp32_precision`` settings in step with them."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def to_float(outputs: dict) -> dict:
    """The model's output dict (tensors, and ``aux_outputs``: a list of such dicts) in fp32: losses run in fp32.
    util.amp.to_float in our checkout; the original has none, and this file measures it without ours on the path."""
    out = {k: v.float() for k, v in outputs.items() if k != "aux_outputs"}
    if "aux_outputs" in outputs:
        out["aux_outputs"] = [to_float(aux) for aux in outputs["aux_outputs"]]
    return out


def measure(fn, batch: int, device, warmup: int, iters: int) -> dict:
    """images/s, ms/image and peak memory of ``fn`` (one batch of ``batch`` images per call). Its own timer, not
    tools.benchmarks.cpu's: that is ours, absent from the original's checkout, and takes the best call, not the mean."""
    import torch

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync()
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    seconds = (time.perf_counter() - start) / iters
    return {"images_per_s": batch / seconds, "ms_per_image": 1000 * seconds / batch,
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None,
            "warmup_s": first_s}


def normalised_images(shapes, seed: int = 0) -> list:
    """ImageNet-normalised random images, one [3, h, w] tensor per (h, w) in ``shapes``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return [(torch.rand(3, *shape, generator=g) - mean) / std for shape in shapes]


def random_targets(counts: list[int], device="cpu", seed: int = 1, num_classes: int = 91) -> list[dict]:
    """Targets of ``len(counts)`` images: ``counts[i]`` labels in [1, num_classes) and boxes (cx, cy, w, h),
    normalised, inside the image."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centers, wh = torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.randint(1, num_classes, (n,), generator=g).to(device),
                    "boxes": torch.cat([centers, wh], 1).to(device)})
    return out


def weighted_loss(losses: dict, weight_dict: dict):
    return sum(losses[k] * w for k, w in weight_dict.items() if k in losses)


def images(shape, batch: int, device):
    """A NestedTensor of ``batch`` random images, built by the measured repository's own
    ``util.misc.nested_tensor_from_tensor_list`` (a public name of both)."""
    from util.misc import nested_tensor_from_tensor_list

    return nested_tensor_from_tensor_list(normalised_images([shape] * batch)).to(device)


def no_download():
    """The original's Backbone asks torchvision for ImageNet weights on the main process (``pretrained=
    is_main_process()``); random weights here, and no network: make it see a non-main process."""
    import models.backbone

    if hasattr(models.backbone, "is_main_process"):
        models.backbone.is_main_process = lambda: False


def parser_defaults(model: str):
    """The measured repository's ``main.py`` defaults (this one's parser lives in util.args and imports no
    pycocotools; the original's is in main.py, which imports its datasets and so pycocotools)."""
    try:
        from util.args import get_args_parser
    except ImportError:
        from main import get_args_parser
    args = get_args_parser().parse_args([])
    args.device, args.backbone_weights, args.num_classes = "cpu", "none", 91
    if model == "tiny":
        for k, v in TINY.items():
            setattr(args, k, v)
    return args


def inference_rows(spec: dict, device, compiled_modes: bool = False) -> None:
    """The inference rows of the eager modes or (``compiled_modes``) of the ``+compile`` ones."""
    import torch

    no_download()
    if spec["model"] == "tiny":
        from models import build_model

        model = build_model(parser_defaults("tiny"))[0]
    else:
        import hubconf

        model = hubconf.detr_resnet50(pretrained=False)
    model.eval().to(device)
    h, w = spec["infer_shape"]
    compiled = None
    for batch in spec["infer_batches"]:
        samples = images((h, w), batch, device)
        for mode in [m for m in spec["infer_modes"] if m.endswith("+compile") == compiled_modes]:
            row = {"key": f"infer/{batch}/{mode}", "batch": batch, "mode": mode}
            net = model
            if mode.endswith("+compile"):
                try:
                    from util.compile import CompiledOrEager
                except ImportError:
                    emit(dict(row, status="skipped", reason="this checkout has no --compile (util.compile)"))
                    continue
                if compiled is None:
                    # one graph per batch size (dynamic=False): the fastest code for each measured shape
                    compiled = CompiledOrEager(model, dynamic=False, backend=spec.get("compile_backend", "inductor"))
                net = compiled
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode.split("+")[0])  # None: fp32, tf32

            def call():
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    net(samples)
            try:
                with tf32(mode == "tf32"):
                    result = measure(call, batch, device, spec["warmup"], spec["iters"])
            except Exception as err:  # OOM, an op without a kernel ...: this row fails, the others still run
                emit(dict(row, status="FAIL", reason=error_text(err)))
                continue
            if net is compiled and compiled.failed:
                emit({**row, **result, "status": "FAIL", "reason": "torch.compile failed; eager fallback measured"})
                continue
            if net is compiled:
                result["note"] = f"first calls (compilation) {result['warmup_s']:.0f} s"
            emit({**row, **result, "status": "ok"})


def train_rows(spec: dict, device) -> None:
    import torch

    no_download()
    try:
        args = parser_defaults(spec["model"])
    except ImportError as err:
        for mode in spec["train_modes"]:
            emit({"key": f"train/{mode}", "status": "skipped",
                  "reason": f"{getattr(err, 'name', None) or err} missing (this checkout's main.py imports it)"})
        return
    from models import build_model

    args.device = str(device)
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    model.train().to(device)
    criterion.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    batch = spec["train_batch"]
    samples = images(spec["train_shape"], batch, device)
    targets = random_targets([5] * batch, device)
    for mode in spec["train_modes"]:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                outputs = model(samples)
            losses = criterion(to_float(outputs), targets)
            loss = weighted_loss(losses, criterion.weight_dict)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
        row = {"key": f"train/{mode}", "batch": batch, "mode": mode}
        try:
            with tf32(False):
                emit({**row, **measure(step, batch, device, spec["warmup"], spec["iters"]), "status": "ok"})
        except Exception as err:
            emit(dict(row, status="FAIL", reason=error_text(err)))


def main() -> None:
    spec = json.loads(sys.argv[1])
    sys.path[0] = spec["repo"]  # that checkout's models/ and util/, in place of this file's folder (no shadowing)
    import torch

    device = torch.device(spec["device"])
    emit({"key": "device", "status": "ok", "torch": torch.__version__,
          "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"})
    # compilation last: it takes the longest, and a timeout then leaves the other rows measured
    parts = (("eager inference", inference_rows, {}), ("training", train_rows, {}),
             ("compiled inference", inference_rows, {"compiled_modes": True}))
    for name, part, kwargs in parts:
        try:
            part(spec, device, **kwargs)
        except Exception as err:  # e.g. the checkout cannot be imported: say so, the caller marks its rows
            traceback.print_exc()
            emit({"key": name, "status": "FAIL", "reason": error_text(err)})


if __name__ == "__main__":
    main()
