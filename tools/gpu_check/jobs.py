"""Sections 3 and 4 of ``tools.gpu_check``: ``main.py`` as a user runs it, on synthetic data.

3. jobs: the synthetic main job (``main.py --dataset_file synthetic --device cuda``, its recipe as it is, plus
   ``--num_workers``) in fp32 and ``--amp bf16``, both at once on the GPU (``--serial_jobs``: one after the
   other, each then alone on the GPU, up to twice the time); each is stopped once ``log.txt`` shows
   ``test_coco_eval_bbox[1]`` (AP50) >= 0.80, or at ``--job_cap`` seconds. Reports minutes of training
   (``elapsed_s``) to that epoch. The synthetic data is generated once into ``$DETR_DATA_DIR`` (or
   ``~/.cache/detr``), about 20 s, and reused by later runs.
4. torchrun: ``torchrun --nproc_per_node 1`` with the NCCL backend trains one epoch of a small synthetic set, then
   ``--eval --resume`` its checkpoint; the evaluation must give the AP the training logged.
"""
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Optional

from tools.gpu_check.report import REPO, Report, error_text, missing, run_to_end, start, stop, subprocess_env, tail


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
    """The JSON lines of a running job's log.txt: none before it exists, and a line still being written is left
    out (util.plot_utils.read_log, for finished logs, raises on it)."""
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
