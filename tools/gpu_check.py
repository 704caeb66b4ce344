"""The CUDA path, proven in one run: correctness against the CPU, speed, the synthetic main job and torchrun + NCCL.

    python -m tools.gpu_check                          # everything, on the GPU (planned: 6 minutes on one H200)
    python -m tools.gpu_check --reference ../detr      # also the original facebookresearch/detr's speed, same GPU
    python -m tools.gpu_check --only correctness       # a subset: correctness, speed, jobs, torchrun
    python -m tools.gpu_check --skip_jobs              # without the two synthetic training jobs (the long rows)
    python -m tools.gpu_check --smoke                  # every row tiny, on CPU (or the GPU): the test runs this

Prints one table: section, check, status (ok / FAIL / skipped: reason), measured value(s), and with
``--reference`` the original's numbers beside ours. Exit status 1 when a row of the correctness or torchrun
sections FAILs (speed and job rows report; they do not gate); 0 otherwise.

1. correctness (TF32 off): the hub models ``detr_resnet50`` and ``detr_resnet50_panoptic`` (random weights,
   ``pretrained=False``, built through hubconf, nothing downloaded) give the CPU's outputs within 1e-4 on CUDA; one
   training step of the R50 model (main.py's defaults, dropout 0 so that both devices compute the same function)
   gives the CPU's losses within 1e-4 and gradients within 1e-3 relative (per parameter, max abs diff over max |grad|);
   ``--amp bf16`` and ``--amp fp16`` steps (fp16 with its GradScaler) are finite and within 2% of the fp32 loss; the
   fp16 scaler's state round-trips through a checkpoint written and read by ``util.checkpoint`` on CUDA.
2. speed (``tools/gpu_check_speed.py``, in a process of its own per checkout): R50 inference at 800x1066, batch 1
   and 8, in fp32 (TF32 off), TF32, bf16 autocast and bf16 + ``--compile``: images/s, ms/image and peak memory
   (``torch.cuda.max_memory_allocated``, reset before each row); an R50 training step at 4 images of 800x1066 in
   fp32 and bf16. ``--reference PATH`` (a checkout of facebookresearch/detr) measures the original the same way in
   its own process, since both checkouts have top-level ``models``/``util`` packages.
3. jobs: the synthetic main job (``main.py --dataset_file synthetic --device cuda``, its recipe as it is, plus
   ``--num_workers``) in fp32 and ``--amp bf16``, both at once on the GPU (``--serial_jobs``: one after the
   other, each then alone on the GPU, up to twice the time); each is stopped once ``log.txt`` shows
   ``test_coco_eval_bbox[1]`` (AP50) >= 0.80, or at ``--job_cap`` seconds. Reports minutes of training
   (``elapsed_s``) to that epoch. The synthetic data is generated once into ``$DETR_DATA_DIR`` (or
   ``~/.cache/detr``), about 20 s, and reused by later runs.
4. torchrun: ``torchrun --nproc_per_node 1`` with the NCCL backend trains one epoch of a small synthetic set, then
   ``--eval --resume`` its checkpoint; the evaluation must give the AP the training logged.

``--smoke`` runs every row tiny (a resnet18 / hidden 32 model instead of R50, 64-pixel images, the jobs cut to one
epoch of 16 images with no AP target, torchrun with gloo on CPU, ``torch.compile`` with its ``eager`` backend) on
CUDA when there is one, else on the CPU, where "cuda vs cpu" rows compare the CPU with itself.

Budget, planned for one H200 with nothing cached and not yet measured there (the first GPU run will tell; the table
ends with each section's seconds): correctness under a minute, speed about 2.5 min (mostly compiling R50 for two
batch sizes), jobs at most --job_cap (100 s) plus about 20 s of data, torchrun about 40 s: about 6 minutes.

Packages the GPU machine may lack: pycocotools (main.py, so the job and torchrun rows, and the original's training
row), hotcoco (faster COCO evaluation; pycocotools is used without it), submitit and panopticapi-lite (no row needs
them; listed in the machine row). A row that needs a missing package says 'skipped: <package> missing'. The GPU
machine has no network: bring them as wheels. On a machine with network and the GPU machine's Python version:

    pip download -d wheels/ --only-binary=:all: "pycocotools>=2.0.7" "hotcoco>=1.1" "submitit>=1.5.4"
    pip download -d wheels/ --no-deps panopticapi-lite==0.2.0

then, with wheels/ copied beside the checkout on the GPU machine:

    pip install --no-index --find-links wheels/ pycocotools hotcoco submitit
    pip install --no-index --find-links wheels/ --no-deps panopticapi-lite
    python -m tools.gpu_check --reference ../detr     # ../detr: a checkout of facebookresearch/detr (optional)
"""
import argparse
import contextlib
import copy
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("correctness", "speed", "jobs", "torchrun")
GATING = ("correctness", "torchrun")  # a FAIL here makes the exit status 1
OPTIONAL_PACKAGES = {"pycocotools": "pycocotools", "hotcoco": "hotcoco", "submitit": "submitit",
                     "panopticapi-lite": "panopticapi"}
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
INFER_MODES = ("fp32", "tf32", "bf16", "bf16+compile")
WORKER_PARTS = ("eager inference", "training", "compiled inference")  # tools/gpu_check_speed.py's parts
MODE_NAMES = {"fp32": "fp32 (TF32 off)", "tf32": "TF32", "bf16": "bf16 autocast", "bf16+compile": "bf16 + --compile"}
# tiny model flags for --smoke (every flag explicit, so the synthetic recipe applies to none of them)
TINY_MODEL = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=64,
                  num_queries=10, dropout=0.0)
TINY_FLAGS = ["--backbone", "resnet18", "--backbone_weights", "none", "--backbone_last_layer", "layer4",
              "--hidden_dim", "32", "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "64",
              "--nheads", "2", "--num_queries", "10", "--dropout", "0", "--scales", "64", "--max_size", "80",
              "--val_size", "64", "--crop_scales", "--warmup_iters", "0", "--lr_drop", "100", "--batch_size", "4"]


def sizes(smoke: bool) -> dict:
    """What each row runs on: the full check, or --smoke's tiny version of every row."""
    if smoke:
        return dict(model="tiny", check_shapes=[(48, 64), (56, 48)], infer_shape=(64, 80), infer_batches=[1, 2],
                    train_shape=(64, 80), train_batch=2, warmup=1, iters=1, compile_backend="eager",
                    job_data=dict(num_train=16, num_val=8, image_size=64), job_flags=TINY_FLAGS + ["--epochs", "1"],
                    target_ap50=None, run_data=dict(num_train=8, num_val=4, image_size=64), run_flags=TINY_FLAGS)
    return dict(model="r50", check_shapes=[(480, 640), (512, 576)], infer_shape=(800, 1066), infer_batches=[1, 8],
                train_shape=(800, 1066), train_batch=4, warmup=3, iters=10, compile_backend="inductor",
                job_data=None, job_flags=[], target_ap50=0.80,
                run_data=dict(num_train=64, num_val=16, image_size=128), run_flags=["--epochs", "1"])


# -- the table -------------------------------------------------------------------------------------------------

class Report:
    def __init__(self, reference: bool):
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.reference = reference
        self.seconds: dict[str, float] = {}

    def add(self, section: str, name: str, status: str, value: str = "", original: str = "") -> None:
        self.rows.append((section, name, status, value, original))
        print(f"[{section}] {name}: {status}{'  ' + value if value else ''}"
              f"{'  | original: ' + original if original else ''}", flush=True)

    def check(self, section: str, name: str, passed: bool, value: str, why: str = "") -> None:
        self.add(section, name, "ok" if passed else f"FAIL{': ' + why if why else ''}", value)

    def failed(self, sections=GATING) -> list[tuple]:
        return [r for r in self.rows if r[0] in sections and r[2].startswith("FAIL")]

    def markdown(self) -> str:
        head = ["section", "check", "status", "value"]
        if self.reference:
            head.append("original (facebookresearch/detr)")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            cells = list(row if self.reference else row[:4])
            lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
        lines.append("")
        lines.append("seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in self.seconds.items())
                     + f"; total {sum(self.seconds.values()) / 60:.1f} min")
        return "\n".join(lines)


def missing(*packages: str) -> Optional[str]:
    """'skipped: <package> missing' for the first of ``packages`` (pip names) that cannot be imported, else None."""
    for name in packages:
        if importlib.util.find_spec(OPTIONAL_PACKAGES.get(name, name)) is None:
            return f"skipped: {name} missing"
    return None


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


# -- subprocesses ----------------------------------------------------------------------------------------------

def subprocess_env(smoke: bool) -> dict:
    """This environment without any launcher's variables, with this checkout importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = str(REPO)
    if smoke:  # several small processes at once on a few cores: one thread each
        env["OMP_NUM_THREADS"] = "1"
    return env


def start(cmd: list, env: dict, log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """A process in a session of its own (so that a stop ends its children too), its output into ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """End ``proc`` and its children (its process group): SIGTERM, then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_to_end(cmd: list, env: dict, log: Path, timeout: float, cwd: Path = REPO) -> tuple[Optional[int], str]:
    """Run ``cmd`` for at most ``timeout`` seconds: (exit status, or None when stopped at the timeout; its output)."""
    proc = start(cmd, env, log, cwd)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        code = None
    return code, log.read_text(errors="replace")


def tail(text: str, n: int = 3) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-n:])[-400:]


# -- 0. the machine --------------------------------------------------------------------------------------------

def machine(report: Report, device) -> None:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        what = "CPU (no CUDA device: rows compare the CPU with itself)"
    report.add("machine", "device", "ok", f"{what}; torch {torch.__version__}")
    found = [p for p in OPTIONAL_PACKAGES if missing(p) is None]
    lacking = [p for p in OPTIONAL_PACKAGES if p not in found]
    report.add("machine", "packages", "ok", f"found: {', '.join(found) or 'none'}"
               + (f"; missing: {', '.join(lacking)} (their rows are skipped)" if lacking else ""))


# -- 1. correctness --------------------------------------------------------------------------------------------

def model_args(cfg: dict, **overrides):
    """main.py's defaults (util.args: no pycocotools needed) for a model built outside main.py."""
    from util.args import get_args_parser

    args = get_args_parser().parse_args([])
    args.device, args.backbone_weights, args.num_classes = "cpu", "none", 91
    if cfg["model"] == "tiny":
        overrides = {**TINY_MODEL, **overrides}
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def hub_model(name: str, cfg: dict):
    """The hub model (random weights) or, with --smoke, a tiny model of the same kind."""
    import torch

    torch.manual_seed(0)
    if cfg["model"] == "r50":
        import hubconf

        return getattr(hubconf, name)(pretrained=False)
    from models import build_model

    masks = name.endswith("panoptic")  # the mask head's GroupNorm(8) needs hidden_dim % 128 == 0 and 8 heads
    args = model_args(cfg, masks=masks, aux_loss=False, **(dict(hidden_dim=128, nheads=8) if masks else {}))
    return build_model(args)[0]


def normalised_images(shapes, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return [(torch.rand(3, *shape, generator=g) - mean) / std for shape in shapes]


def targets_for(n_images: int, seed: int = 1, num_classes: int = 91):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_images):
        n = 3 + i
        centers, wh = torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.randint(1, num_classes, (n,), generator=g), "boxes": torch.cat([centers, wh], 1)})
    return out


def on(device, obj):
    import torch

    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: on(device, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on(device, v) for v in obj)
    return obj


def max_abs_diff(a: dict, b: dict) -> tuple[float, str]:
    """The largest |a - b| over the tensors of two output dicts, and the key where it is."""
    import torch

    worst, where = 0.0, ""
    for k, v in a.items():
        if torch.is_tensor(v) and v.is_floating_point():
            d = (v.detach().float().cpu() - b[k].detach().float().cpu()).abs().max().item()
            if not d <= worst:  # NaN counts as the worst
                worst, where = d, k
    return worst, where


def check_outputs(report: Report, cfg: dict, device, versus: str) -> None:
    import torch

    label = "hub {}" if cfg["model"] == "r50" else "tiny stand-in for hub {}"
    shapes = cfg["check_shapes"]
    for name in ("detr_resnet50", "detr_resnet50_panoptic"):
        row = f"{label.format(name)} outputs, {versus}, 2 images {shapes[0][0]}x{shapes[0][1]} + " \
              f"{shapes[1][0]}x{shapes[1][1]}"
        try:
            model = hub_model(name, cfg).eval()
            images = normalised_images(shapes)
            with torch.no_grad():
                ref = model(images)
                out = copy.deepcopy(model).to(device)(on(device, images))
            diff, where = max_abs_diff(ref, out)
            report.check("correctness", row, diff <= 1e-4, f"max abs diff {diff:.1e} ({where}); tolerance 1e-4",
                         "over 1e-4")
        except Exception as err:
            report.add("correctness", row, f"FAIL: {error_text(err)}")


def weighted_loss(losses: dict, weight_dict: dict):
    return sum(losses[k] * w for k, w in weight_dict.items() if k in losses)


def loss_and_grads(model, criterion, images, targets, amp: str, device, scaler=None):
    """One forward + backward as engine.train_one_epoch does it: autocast around the model only, losses in fp32;
    with ``scaler`` the loss is scaled and the gradients unscaled in place. Returns (losses, total, grads)."""
    from util.amp import autocast, to_float

    model.zero_grad(set_to_none=True)
    with autocast(device, amp):
        outputs = model(images)
    losses = criterion(to_float(outputs), targets)
    total = weighted_loss(losses, criterion.weight_dict)
    (scaler.scale(total) if scaler is not None else total).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, total.detach(), grads


def check_training(report: Report, cfg: dict, device, versus: str) -> None:
    import torch
    from models import build_model

    name = "R50" if cfg["model"] == "r50" else "tiny"
    torch.manual_seed(0)
    # dropout 0: its random masks differ between devices; frozen batch norm: train mode is otherwise eval's function
    model, criterion, _ = build_model(model_args(cfg, dropout=0.0))
    model.train()
    images, targets = normalised_images(cfg["check_shapes"]), targets_for(len(cfg["check_shapes"]))
    dev_model, dev_criterion = copy.deepcopy(model).to(device), copy.deepcopy(criterion).to(device)
    dev_images, dev_targets = on(device, images), on(device, targets)

    row = f"{name} training step (fp32, aux losses): losses, {versus}"
    try:
        ref_losses, ref_total, ref_grads = loss_and_grads(model, criterion, images, targets, "off", torch.device("cpu"))
        losses, total, grads = loss_and_grads(dev_model, dev_criterion, dev_images, dev_targets, "off", device)
        # the weighted losses (class_error and cardinality_error are logged metrics, not losses)
        diffs = {k: abs(losses[k].item() - v.item()) for k, v in ref_losses.items() if k in criterion.weight_dict}
        diffs["total"] = abs(total.item() - ref_total.item())
        worst = max(diffs, key=lambda k: diffs[k] if diffs[k] == diffs[k] else float("inf"))
        report.check("correctness", row, all(d <= 1e-4 for d in diffs.values()),
                     f"{len(diffs)} losses, max abs diff {diffs[worst]:.1e} ({worst}); total {ref_total.item():.4f}",
                     "over 1e-4")
        rel = {}
        for n, g in ref_grads.items():
            scale = max(g.abs().max().item(), 1e-12)
            rel[n] = (grads[n].float().cpu() - g).abs().max().item() / scale
        worst = max(rel, key=lambda k: rel[k] if rel[k] == rel[k] else float("inf"))
        same_set = grads.keys() == ref_grads.keys()
        report.check("correctness", f"{name} training step (fp32): gradients, {versus}",
                     same_set and rel[worst] <= 1e-3,
                     f"{len(rel)} parameters, max abs diff / max abs grad {rel[worst]:.1e} ({worst}); tolerance 1e-3",
                     "over 1e-3" if same_set else "not the same parameters have gradients")
    except Exception as err:
        report.add("correctness", row, f"FAIL: {error_text(err)}")
        return
    fp32_total = total.item()
    del model, criterion, ref_grads
    fp16 = check_amp(report, name, dev_model, dev_criterion, dev_images, dev_targets, device, fp32_total)
    check_scaler_checkpoint(report, fp16, dev_criterion, dev_images, dev_targets, device)


def check_amp(report: Report, name: str, model, criterion, images, targets, device, fp32_total: float):
    """--amp bf16 and fp16 steps: finite, and within 2% of the fp32 loss. Returns the fp16 GradScaler (None on
    failure). fp16 gets up to 17 tries: an overflow at the scaler's first scale (65536) is what the scaler is for:
    it skips the step and halves the scale, as in training (the tiny model overflows down to 2048)."""
    import torch
    from util.amp import grad_scaler

    fp16_scaler = None
    for amp in ("bf16", "fp16"):
        row = f"{name} training step --amp {amp}{' (GradScaler)' if amp == 'fp16' else ''} on {device.type}"
        try:
            net = copy.deepcopy(model)
            optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
            scaler = grad_scaler(device, amp)
            tries = 17 if scaler is not None else 1
            for attempt in range(1, tries + 1):
                optimizer.zero_grad(set_to_none=True)
                _, total, grads = loss_and_grads(net, criterion, images, targets, amp, device, scaler)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                finite = all(torch.isfinite(g).all() for g in grads.values())
                if scaler is None:
                    optimizer.step()
                    break
                scale = scaler.get_scale()
                scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/NaN
                scaler.update()
                if finite:
                    break
            rel = abs(total.item() - fp32_total) / abs(fp32_total)
            params_finite = all(torch.isfinite(p).all() for p in net.parameters())
            value = f"loss {total.item():.4f} vs fp32 {fp32_total:.4f} ({100 * rel:.2f}%); gradients " \
                    f"{'finite' if finite else 'NOT finite'}"
            if scaler is not None:
                value += f"; step taken at try {attempt} (scale {scale:g})" if finite else f" after {tries} tries"
            ok = bool(torch.isfinite(total)) and finite and params_finite and rel <= 0.02
            report.check("correctness", row, ok, value, "not finite" if not (finite and params_finite)
                         else "over 2% from fp32")
            if amp == "fp16" and ok:
                fp16_scaler = (net, optimizer, scaler)
        except Exception as err:
            report.add("correctness", row, f"FAIL: {error_text(err)}")
    return fp16_scaler


def check_scaler_checkpoint(report: Report, fp16, criterion, images, targets, device) -> None:
    """The fp16 GradScaler's state (with the model and optimizer) through util.checkpoint (atomic write,
    weights_only read) into a fresh scaler on the same device, which then scales one more step."""
    import torch
    from util.checkpoint import load_checkpoint, save_checkpoint

    row = f"fp16 GradScaler state through a checkpoint on {device.type}"
    if fp16 is None:
        report.add("correctness", row, "FAIL: no fp16 step to take the scaler from (see the row above)")
        return
    net, optimizer, scaler = fp16
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "checkpoint.pth")
            save_checkpoint({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0,
                             "args": {"amp": "fp16"}, "scaler": scaler.state_dict()}, path)
            checkpoint = load_checkpoint(path)
        restored = torch.amp.GradScaler(device.type)
        restored.load_state_dict(checkpoint["scaler"])
        same = restored.state_dict() == scaler.state_dict() and restored.get_scale() == scaler.get_scale()
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = restored.state_dict()
        # the restored scaler works: one more step, scaled, unscaled, taken (or skipped on overflow) and updated
        _, total, _ = loss_and_grads(net, criterion, images, targets, "fp16", device, restored)
        restored.unscale_(optimizer)
        restored.step(optimizer)
        restored.update()
        finite = bool(torch.isfinite(total))
        report.check("correctness", row, same and finite,
                     f"scale {state['scale']:g}, growth tracker {state['_growth_tracker']}; equal to the saved "
                     f"scaler's: {same}; next step's loss {total.item():.4f}, scale then {restored.get_scale():g}",
                     "restored state differs" if not same else "next step not finite")
    except Exception as err:
        report.add("correctness", row, f"FAIL: {error_text(err)}")


def correctness(report: Report, cfg: dict, device) -> None:
    from tools.gpu_check_speed import tf32

    versus = f"{device.type} vs cpu" + (" (no GPU: the CPU against itself)" if device.type == "cpu" else "")
    with tf32(False):
        check_outputs(report, cfg, device, versus)
        check_training(report, cfg, device, versus)


# -- 2. speed --------------------------------------------------------------------------------------------------

def measure_checkout(repo: Path, cfg: dict, device, timeout: float, smoke: bool, work: Path) -> tuple[dict, str]:
    """Run tools/gpu_check_speed.py for the checkout ``repo``; its rows by key, and an error text when it failed."""
    spec = dict(repo=str(repo), device=str(device), model=cfg["model"], infer_shape=list(cfg["infer_shape"]),
                infer_batches=cfg["infer_batches"], infer_modes=list(INFER_MODES), train_shape=list(cfg["train_shape"]),
                train_batch=cfg["train_batch"], train_modes=["fp32", "bf16"], warmup=cfg["warmup"],
                iters=cfg["iters"], compile_backend=cfg["compile_backend"])
    env = subprocess_env(smoke)
    env["PYTHONPATH"] = ""  # only ``repo`` on the path: the worker puts it first itself
    log = work / f"speed-{abs(hash(str(repo)))}.log"
    code, out = run_to_end([sys.executable, REPO / "tools" / "gpu_check_speed.py", json.dumps(spec)], env, log,
                           timeout, cwd=repo)
    rows = {}
    for line in out.splitlines():
        if line.startswith("GPU_CHECK_ROW "):
            row = json.loads(line[len("GPU_CHECK_ROW "):])
            rows[row["key"]] = row
    problem = "" if code == 0 else (f"timed out after {timeout:.0f} s" if code is None
                                    else f"exit status {code}: {tail(out)}")
    return rows, problem


def speed_value(row: Optional[dict], problem: str) -> tuple[str, str]:
    """(status, value) of one measured row."""
    if row is None:
        return "FAIL", f"no result ({problem or 'the worker stopped before this row'})"
    if row["status"] == "skipped":
        return f"skipped: {row['reason']}", ""
    if "images_per_s" not in row:
        return f"FAIL: {row.get('reason', '')}", ""
    peak = f", peak {row['peak_mib']:.0f} MiB" if row.get("peak_mib") is not None else ""
    value = f"{row['images_per_s']:.1f} img/s, {row['ms_per_image']:.2f} ms/img{peak}"
    if row.get("note"):
        value += f"; {row['note']}"
    status = "ok" if row["status"] == "ok" else f"FAIL: {row.get('reason', '')}"
    return status, value


def speed(report: Report, cfg: dict, device, timeout: float, smoke: bool, reference: Optional[Path],
          work: Path) -> None:
    ours, problem = measure_checkout(REPO, cfg, device, timeout, smoke, work)
    theirs, their_problem = ({}, "") if reference is None else measure_checkout(reference, cfg, device, timeout,
                                                                                smoke, work)
    if problem:
        report.add("speed", "speed worker (this checkout)", f"FAIL: {problem}")
    if reference is not None and their_problem:
        report.add("speed", "speed worker (the original)", f"FAIL: {their_problem}")
    for part in WORKER_PARTS:  # a part of the worker that failed as a whole (e.g. a checkout that does not import)
        for who, rows in (("this checkout", ours), ("the original", theirs)):
            if part in rows:
                report.add("speed", f"speed worker ({who}): {part}", f"FAIL: {rows[part].get('reason', '')}")
    name = "R50" if cfg["model"] == "r50" else "tiny model"
    h, w = cfg["infer_shape"]
    keys = [(f"infer/{b}/{m}", f"{name} inference {h}x{w}, batch {b}, {MODE_NAMES[m]}")
            for b in cfg["infer_batches"] for m in INFER_MODES]
    th, tw = cfg["train_shape"]
    keys += [(f"train/{m}", f"{name} training step, {cfg['train_batch']} x {th}x{tw}, {MODE_NAMES[m]}")
             for m in ("fp32", "bf16")]
    for key, label in keys:
        status, value = speed_value(ours.get(key), problem)
        original = ""
        if reference is not None:
            their_status, their_value = speed_value(theirs.get(key), their_problem)
            original = their_value if their_status == "ok" else f"{their_status} {their_value}".strip()
        report.add("speed", label, status, value, original)


# -- 3. the synthetic main job ---------------------------------------------------------------------------------

def synthetic_data(cfg: dict, work: Path, name: str, spec: Optional[dict]) -> tuple[Path, str]:
    """A synthetic dataset: ``spec`` (num_train, num_val, image_size) into ``work``, or None for the default
    dataset in its cache (generated once). Returns its folder and how it came to be."""
    from datasets.synthetic import default_cache_dir, generate

    start_s = time.time()
    root = default_cache_dir(0) if spec is None else work / name
    if spec is None and (root / "annotations" / "instances_val2017.json").is_file():
        return root, f"cached in {root}"
    generate(root, seed=0, **(spec or {}))
    n = spec or dict(num_train=2000, num_val=200)
    return root, f"{n['num_train']} + {n['num_val']} images generated in {time.time() - start_s:.0f} s"


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            lines.append(json.loads(line))
    return lines


def first_reaching(lines: list[dict], target: Optional[float]) -> Optional[dict]:
    for line in lines:
        if target is not None and line.get("test_coco_eval_bbox", [0, 0])[1] >= target:
            return line
    return None


def jobs(report: Report, cfg: dict, device, timeout: float, job_cap: float, workers: int, smoke: bool,
         work: Path, serial: bool = False) -> None:
    absent = missing("pycocotools")
    amps = ("off", "bf16")
    if absent:
        for amp in amps:
            report.add("jobs", f"synthetic main job, --amp {amp}", f"{absent} (main.py needs it)")
        return
    try:
        root, how = synthetic_data(cfg, work, "job_data", cfg["job_data"])
        report.add("jobs", "synthetic data", "ok", how)
    except Exception as err:
        report.add("jobs", "synthetic data", f"FAIL: {error_text(err)}")
        return
    env = subprocess_env(smoke)
    if cfg["job_data"] is None:
        env["DETR_DATA_DIR"] = str(root.parent)  # the cached default dataset, as the real main job reads it
    target = cfg["target_ap50"]
    cap = min(job_cap, timeout)
    procs, ends = {}, {}
    # by default both jobs side by side on the same device (the budget has no room for one after the other); each
    # stops at the target AP50, at its end, or at the cap
    for group in ([[amp] for amp in amps] if serial else [list(amps)]):
        started = time.time()
        for amp in group:
            out = work / f"job_{amp}"
            cmd = [sys.executable, "main.py", "--dataset_file", "synthetic", "--device", device.type, "--output_dir",
                   out, "--num_workers", str(workers), "--amp", amp] + cfg["job_flags"]
            if cfg["job_data"] is not None:
                cmd += ["--coco_path", root]
            procs[amp] = (start(cmd, env, work / f"job_{amp}.out", REPO), out / "log.txt")
        while any(amp not in ends for amp in group):
            time.sleep(0.5 if smoke else 2)
            for amp in group:
                proc, log = procs[amp]
                if amp in ends:
                    continue
                reached = first_reaching(read_log(log), target)
                if reached is not None or proc.poll() is not None or time.time() - started > cap:
                    stop(proc)
                    ends[amp] = (reached, time.time() - started, proc.returncode)
    for amp in amps:
        proc, log = procs[amp]
        reached, wall, code = ends[amp]
        lines = read_log(log)
        label = f"synthetic main job, --amp {amp}" + (f": minutes to AP50 >= {target:.2f}" if target else "") \
            + ("" if serial else " (both jobs at once)")
        output = (work / f"job_{amp}.out").read_text(errors="replace")
        if reached is not None:
            report.add("jobs", label, "ok", f"{reached['elapsed_s'] / 60:.2f} min of training (epoch "
                       f"{reached['epoch']}, AP50 {reached['test_coco_eval_bbox'][1]:.3f}, AP "
                       f"{reached['test_coco_eval_bbox'][0]:.3f}); {wall / 60:.2f} min wall")
        elif target is None and lines and code == 0:
            last = lines[-1]
            report.add("jobs", label, "ok", f"{len(lines)} epoch(s) in {last['elapsed_s'] / 60:.2f} min, AP50 "
                       f"{last['test_coco_eval_bbox'][1]:.3f} (--smoke: no AP target)")
        elif lines:
            best = max(lines, key=lambda x: x["test_coco_eval_bbox"][1])
            why = ("stopped at the cap" if wall >= cap else f"the job ended (exit status {code})")
            report.add("jobs", label, f"FAIL: AP50 {target} not reached, {why}",
                       f"best AP50 {best['test_coco_eval_bbox'][1]:.3f} at epoch {best['epoch']} "
                       f"({best['elapsed_s'] / 60:.2f} min); {len(lines)} epochs in {wall:.0f} s (--job_cap "
                       f"{job_cap:.0f})")
        else:
            why = f"no epoch finished within the cap of {cap:.0f} s" if code is None or wall >= cap \
                else f"exit status {code}"
            report.add("jobs", label, f"FAIL: {why}", tail(output))


# -- 4. torchrun -----------------------------------------------------------------------------------------------

def torchrun(report: Report, cfg: dict, device, timeout: float, smoke: bool, work: Path) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    train_label = f"torchrun --nproc_per_node 1, {backend}, {device.type}: one synthetic epoch"
    eval_label = f"torchrun --nproc_per_node 1, {backend}: --eval --resume of its checkpoint"
    absent = missing("pycocotools")
    if absent:
        report.add("torchrun", train_label, f"{absent} (main.py needs it)")
        report.add("torchrun", eval_label, f"{absent} (main.py needs it)")
        return
    try:
        root, how = synthetic_data(cfg, work, "torchrun_data", cfg["run_data"])
    except Exception as err:
        report.add("torchrun", train_label, f"FAIL: synthetic data: {error_text(err)}")
        return
    out = work / "torchrun"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "main.py"]
    common = ["--dataset_file", "synthetic", "--coco_path", root, "--device", device.type, "--dist_backend", backend,
              "--num_workers", "2" if not smoke else "0"] + cfg["run_flags"]
    env = subprocess_env(smoke)
    start_s = time.time()
    code, text = run_to_end(launcher + common + ["--output_dir", out], env, work / "torchrun_train.out", timeout)
    seconds = time.time() - start_s
    lines = read_log(out / "log.txt")
    said_backend = f"backend {backend}" in text
    if code != 0 or not lines or not (out / "checkpoint.pth").is_file():
        why = f"timed out after {timeout:.0f} s" if code is None else f"exit status {code}"
        report.add("torchrun", train_label, f"FAIL: {why}", tail(text))
        report.add("torchrun", eval_label, "skipped: the training row failed")
        return
    logged = lines[-1]["test_coco_eval_bbox"]
    report.check("torchrun", train_label, said_backend, f"{seconds:.0f} s; process group on {backend}: "
                 f"{said_backend}; logged AP {logged[0]:.4f}, AP50 {logged[1]:.4f} ({how})",
                 f"the log does not show backend {backend}")
    start_s = time.time()
    code, text = run_to_end(launcher + common + ["--eval", "--resume", out / "checkpoint.pth", "--output_dir",
                                                 out / "eval"], env, work / "torchrun_eval.out", timeout)
    seconds = time.time() - start_s
    if code != 0 or not (out / "eval" / "eval.pth").is_file():
        why = f"timed out after {timeout:.0f} s" if code is None else f"exit status {code}"
        report.add("torchrun", eval_label, f"FAIL: {why}", tail(text))
        return
    import torch

    stats = torch.load(out / "eval" / "eval.pth", weights_only=True)["stats"]
    diff = max(abs(a - b) for a, b in zip(stats, logged))
    report.check("torchrun", eval_label, diff <= 1e-3, f"{seconds:.0f} s; AP {stats[0]:.4f}, AP50 {stats[1]:.4f}; "
                 f"max abs diff to the training log's 12 numbers {diff:.1e}", "not the AP the training logged")


# -- the command -----------------------------------------------------------------------------------------------

def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="One prepared check of DETR's CUDA path: correctness against the "
                                                 "CPU, speed, the synthetic main job, torchrun with NCCL.")
    parser.add_argument("--smoke", action="store_true",
                        help="every row tiny (tiny model, small images, 1-epoch jobs, gloo): runs on CPU in a minute")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections")
    parser.add_argument("--skip_jobs", action="store_true", help="leave out the synthetic main jobs (section 3)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="a checkout of facebookresearch/detr: its speed rows beside ours (same GPU)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (with --smoke)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds allowed to each subprocess")
    parser.add_argument("--job_cap", type=float, default=100,
                        help="seconds after which a synthetic job is stopped if AP50 >= 0.80 was not reached")
    parser.add_argument("--serial_jobs", action="store_true",
                        help="run the fp32 and bf16 synthetic jobs one after the other instead of at once (up to "
                             "twice the time)")
    parser.add_argument("--job_workers", type=int, default=None,
                        help="--num_workers of the synthetic jobs (default 4; 0 with --smoke)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("tools.gpu_check: no CUDA device here; the full check is for a GPU. On CPU run "
                         "`python -m tools.gpu_check --smoke`.")
    if args.reference is not None and not (args.reference / "hubconf.py").is_file():
        raise SystemExit(f"--reference {args.reference}: no hubconf.py there (expected a facebookresearch/detr "
                         f"checkout)")
    cfg = sizes(args.smoke)
    if args.smoke:  # tiny tensors gain nothing from threads, and a shared CPU loses much to their spinning
        torch.set_num_threads(1)
    sections = list(args.only or SECTIONS)
    if args.skip_jobs and "jobs" in sections:
        sections.remove("jobs")
    workers = args.job_workers if args.job_workers is not None else (0 if args.smoke else 4)
    report = Report(reference=args.reference is not None)
    machine(report, device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        work = Path(folder)
        runs = {"correctness": lambda: correctness(report, cfg, device),
                "speed": lambda: speed(report, cfg, device, args.timeout, args.smoke,
                                       args.reference.resolve() if args.reference else None, work),
                "jobs": lambda: jobs(report, cfg, device, args.timeout, args.job_cap, workers, args.smoke, work,
                                     args.serial_jobs),
                "torchrun": lambda: torchrun(report, cfg, device, args.timeout, args.smoke, work)}
        for section in SECTIONS:
            if section not in sections:
                continue
            start_s = time.time()
            try:
                runs[section]()
            except Exception as err:  # a section that cannot run at all is one failed row, the others still run
                report.add(section, "section", f"FAIL: {error_text(err)}")
            report.seconds[section] = time.time() - start_s
    print("\n" + report.markdown(), flush=True)
    failed = report.failed()
    if failed:
        print(f"\n{len(failed)} correctness/torchrun row(s) FAILED", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
