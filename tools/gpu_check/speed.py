"""Section 2 of ``tools.gpu_check``: speed, measured by ``speed_worker.py`` in a process of its own per checkout.

R50 inference at 800x1066, batch 1 and 8, in fp32 (TF32 off), TF32, bf16 autocast and bf16 + ``--compile``:
images/s, ms/image and peak memory (``torch.cuda.max_memory_allocated``, reset before each row); an R50 training
step at 4 images of 800x1066 in fp32 and bf16. ``--reference PATH`` (a checkout of facebookresearch/detr) measures
the original the same way in its own process, since both checkouts have top-level ``models``/``util`` packages.
"""
import json
import sys
from pathlib import Path
from typing import Optional

from tools.gpu_check.report import REPO, Report, run_to_end, subprocess_env, tail

INFER_MODES = ("fp32", "tf32", "bf16", "bf16+compile")
WORKER_PARTS = ("eager inference", "training", "compiled inference")  # speed_worker.py's parts
WORKER = REPO / "tools" / "gpu_check" / "speed_worker.py"
MODE_NAMES = {"fp32": "fp32 (TF32 off)", "tf32": "TF32", "bf16": "bf16 autocast", "bf16+compile": "bf16 + --compile"}


def measure_checkout(repo: Path, cfg: dict, device, timeout: float, smoke: bool, work: Path) -> tuple[dict, str]:
    """Run speed_worker.py for the checkout ``repo``; its rows by key, and an error text when it failed."""
    spec = dict(repo=str(repo), device=str(device), model=cfg["model"], infer_shape=list(cfg["infer_shape"]),
                infer_batches=cfg["infer_batches"], infer_modes=list(INFER_MODES), train_shape=list(cfg["train_shape"]),
                train_batch=cfg["train_batch"], train_modes=["fp32", "bf16"], warmup=cfg["warmup"],
                iters=cfg["iters"], compile_backend=cfg["compile_backend"])
    env = subprocess_env(smoke)
    env["PYTHONPATH"] = ""  # only ``repo`` on the path: the worker puts it first itself
    log = work / f"speed-{abs(hash(str(repo)))}.log"
    code, out = run_to_end([sys.executable, WORKER, json.dumps(spec)], env, log, timeout, cwd=repo)
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
