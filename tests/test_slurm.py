"""run_with_submitit.py: job parameters, errors, requeue logic, and real 2-task jobs (CPU, gloo, tiny model) on
Slurm (a cluster such as the one .ci/slurm-up starts; skipped where `sbatch` is absent) and through submitit's
local executor (no Slurm)."""
import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

submitit = pytest.importorskip("submitit")

import run_with_submitit as rws  # noqa: E402
from datasets.synthetic import generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset_file", "synthetic", "--backbone", "resnet18", "--backbone_weights", "none",
        "--backbone_norm", "frozen_bn", "--backbone_last_layer", "layer4", "--hidden_dim", "32", "--enc_layers", "1",
        "--dec_layers", "1", "--dim_feedforward", "64", "--nheads", "2", "--num_queries", "5", "--dropout", "0",
        "--scales", "64", "--max_size", "80", "--val_size", "64", "--crop_scales", "--num_workers", "0",
        "--device", "cpu", "--batch_size", "1", "--warmup_iters", "0", "--lr_drop", "100"]
JOB = ["--ngpus", "2", "--cpus_per_task", "1", "--mem_gb", "0", "--timeout", "10"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}


@pytest.fixture(scope="module")
def slurm():
    """Skip where there is no Slurm to submit to (.ci/slurm-up starts a one-machine cluster; CI runs it)."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not found: no Slurm here (.ci/slurm-up starts a one-machine cluster)")
    probe = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"no Slurm controller answers (sinfo: {probe.stderr.strip()}); start one with .ci/slurm-up")


def parse(argv: list) -> argparse.Namespace:
    return rws.parse_args(argv)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("submitit") / "data"
    generate(root, seed=0, num_train=8, num_val=4, image_size=64)
    return root


def clean_environ() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_"))}
    env.pop("OMP_NUM_THREADS", None)  # run_with_submitit limits the threads from --cpus_per_task
    return env


def submit(argv: list, timeout: float = 300, env: dict = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "run_with_submitit.py"] + argv, cwd=REPO,
                          env=dict(clean_environ(), **(env or {})), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"run_with_submitit.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-5000:]}"
    return proc


def job_logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(folder.glob("*_log.*")))


def log_epochs(out: Path) -> list:
    return [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]


# -- without a cluster -------------------------------------------------------------------------------------

def test_sbatch_parameters_from_the_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(rws.shutil, "which", lambda name: "/usr/bin/" + name)
    args = parse(["--nodes", "2", "--ngpus", "8", "--timeout", "4320", "--partition", "gpu", "--account", "proj",
                  "--qos", "high", "--constraint", "a100", "--use_volta32", "--exclude", "node[1-3]",
                  "--comment", "deadline friday", "--device", "cuda", "--job_dir", str(tmp_path / "%j")])
    executor = rws.build_executor(args)
    text = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--mem=320GB",
                 "--time=4320", "--partition=gpu", "--account=proj", "--qos=high", "--constraint='a100&volta32gb'",
                 "--exclude='node[1-3]'", "--comment='deadline friday'", "--job-name=detr", "--signal=USR2@90"):
        assert f"#SBATCH {line}\n" in text, line
    assert "srun " in text and "--kill-on-bad-exit=1" in text


def test_cpu_job_asks_for_no_gpu_and_mem_0_for_the_default_memory(monkeypatch, tmp_path):
    monkeypatch.setattr(rws.shutil, "which", lambda name: "/usr/bin/" + name)
    args = parse(JOB + ["--device", "cpu", "--job_dir", str(tmp_path / "%j")])
    text = rws.build_executor(args)._executor._make_submission_file_text("cmd", "uid")
    assert "--gpus-per-node" not in text and "--mem" not in text and "#SBATCH --ntasks-per-node=2\n" in text


def test_slurm_without_sbatch_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(rws.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="`sbatch` is not on PATH.*--cluster local"):
        rws.build_executor(parse(["--job_dir", str(tmp_path / "%j")]))


def test_timeout_too_short_for_the_requeue_signal():
    with pytest.raises(SystemExit, match="--timeout 2: use at least 3 minutes"):
        rws.main(["--timeout", "2"])


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match=r"the output folder .*a_file/out is not writable from"):
        rws.main(["--cluster", "local", "--job_dir", str(tmp_path / "jobs" / "%j"),
                  "--output_dir", str(tmp_path / "a_file" / "out")])


def test_default_number_of_nodes():
    assert parse([]).nodes == 4  # Slurm: the original's default
    assert parse(["--cluster", "local"]).nodes == 1 and parse(["--cluster", "debug"]).nodes == 1
    assert parse(["--cluster", "local", "--nodes", "2"]).nodes == 2  # refused by build_executor


def test_local_cluster_is_one_node(tmp_path):
    with pytest.raises(SystemExit, match="--cluster local runs on this machine only: use --nodes 1"):
        rws.build_executor(parse(["--cluster", "local", "--nodes", "2", "--job_dir", str(tmp_path / "%j")]))


def test_default_job_folder(monkeypatch):
    monkeypatch.delenv("DETR_JOB_DIR", raising=False)
    assert rws.default_job_dir() == str(Path("runs/submitit/%j").resolve())
    monkeypatch.setenv("DETR_JOB_DIR", "/shared/me/detr")
    assert rws.default_job_dir() == "/shared/me/detr/%j"
    monkeypatch.setenv("DETR_JOB_DIR", "/shared/me/detr/%j-run")
    assert rws.default_job_dir() == "/shared/me/detr/%j-run"


def test_a_restarted_job_resumes_from_its_output_folder(tmp_path):
    args = parse(["--resume", "elsewhere.pth", "--finetune", ""])
    rws.resume_from_own_checkpoint(args, tmp_path)
    assert args.resume == "elsewhere.pth"  # nothing in the folder yet
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    rws.resume_from_own_checkpoint(args, tmp_path)
    assert args.resume == str(tmp_path / "checkpoint.pth")
    args = parse(["--finetune", "base.pth"])
    rws.resume_from_own_checkpoint(args, tmp_path)
    assert (args.resume, args.finetune) == (str(tmp_path / "checkpoint.pth"), "")
    args = parse(["--eval", "--resume", "model.pth"])
    rws.resume_from_own_checkpoint(args, tmp_path)
    assert args.resume == "model.pth"  # evaluation evaluates what it was asked to


def test_a_restarted_two_stage_job_leaves_resuming_to_the_stages(tmp_path):
    """--two_stage (asked for, or synthetic_panoptic's default) resumes each stage from its own folder
    (util.two_stage.train_two_stages): --resume OUTPUT_DIR/checkpoint.pth would make it one mask-less stage."""
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    for argv in (["--dataset_file", "synthetic_panoptic"], ["--two_stage"]):
        args = parse(argv)
        rws.resume_from_own_checkpoint(args, tmp_path)
        assert args.resume == "", argv
    args = parse(["--dataset_file", "synthetic_panoptic", "--no-two_stage"])  # one stage: as any job
    rws.resume_from_own_checkpoint(args, tmp_path)
    assert args.resume == str(tmp_path / "checkpoint.pth")


def test_checkpoint_requeues_the_submitted_arguments():
    args = parse(["--epochs", "7"])
    trainer = rws.Trainer(args)
    delayed = trainer.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, rws.Trainer) and delayed.function is not trainer
    assert vars(delayed.function.args) == vars(args)


# -- real jobs ---------------------------------------------------------------------------------------------

def test_cluster_local_runs_the_two_task_job(data_dir, tmp_path):
    """No Slurm: submitit's local executor starts the 2 tasks here; they form a gloo group on 127.0.0.1."""
    proc = submit(["--cluster", "local", "--job_dir", str(tmp_path / "%j"), "--coco_path", str(data_dir),
                   "--epochs", "1"] + JOB + TINY)
    job_id = re.search(r"Submitted job (\S+) \(local\)", proc.stdout).group(1)
    assert "effective batch size 2 (1 per process x 2)" in proc.stdout
    folder = tmp_path / job_id
    assert (folder / "checkpoint.pth").is_file(), job_logs(folder)
    assert log_epochs(folder) == [0]
    # info messages come from rank 0 only (rank 1 joined: the effective batch size above counts it)
    assert "distributed init (submitit-local): rank 0 of 2" in (folder / f"{job_id}_0_log.out").read_text()
    assert "distributed init" not in (folder / f"{job_id}_1_log.out").read_text()
    assert sorted(p.name for p in folder.glob("*_result.pkl")) == [f"{job_id}_0_result.pkl", f"{job_id}_1_result.pkl"]


def _scontrol_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def _wait(what: str, predicate, folder: Path, timeout: float = 240):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{job_logs(folder)}")


def _ckpt_epoch(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


# The jobs below hold at the end of each epoch while OUTPUT_DIR/HOLD exists (util.dist.wait_at_test_gate): the test
# requeues them at points it chooses, whatever the speed of the machine; the timeouts only guard against a hang.
GATE = "HOLD"
REQUEUE_EPOCHS = 4


def _wait_for_state(job_id: str, folder: Path) -> str:
    return _wait("the end of the job", lambda: (m := re.search(r"JobState=(\w+)", _scontrol_job(job_id)))
                 and m.group(1) in FINAL_STATES and m.group(1), folder, timeout=600)


@contextlib.contextmanager
def _cancelled_at_exit(job_id: str):
    """``scancel`` the job when the block ends, however it ends (a no-op for a finished job)."""
    try:
        yield
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


def _wait_completed(job_id: str, folder: Path, restarts: int) -> None:
    """Wait for the job to end; it must be COMPLETED after ``restarts`` requeues."""
    assert _wait_for_state(job_id, folder) == "COMPLETED", job_logs(folder)
    assert f"Restarts={restarts}" in _scontrol_job(job_id)


def _logged_epochs(out: Path) -> list:
    return log_epochs(out) if (out / "log.txt").exists() else []


def _submit_gated(out: Path, tmp_path: Path, argv: list) -> tuple:
    """Submit a Slurm job whose processes wait at the end of each epoch while OUTPUT_DIR/GATE exists; returns its
    id, its job folder and a reader of rank 0's log."""
    proc = submit(["--nodes", "1", "--job_dir", str(tmp_path / "job" / "%j"), "--output_dir", str(out)] + argv,
                  env={"DETR_TEST_GATE": GATE})
    job_id = re.search(r"Submitted job (\d+) \(slurm\)", proc.stdout).group(1)
    folder = tmp_path / "job" / job_id
    rank0_log = folder / f"{job_id}_0_log.out"
    return job_id, folder, lambda: rank0_log.read_text() if rank0_log.exists() else ""


def test_slurm_job_requeued_twice_resumes_and_finishes(slurm, data_dir, tmp_path):
    """A real 2-task Slurm job (CPU, gloo): requeued by the cluster at the end of epoch 0 (`scontrol requeue`, as a
    preemption: submitit's checkpoint() is not called), then sent the time-limit signal (USR2: checkpoint() requeues
    it) at the end of epoch 1; each run resumes from the output folder's checkpoint.pth and the epochs continue."""
    out = tmp_path / "out"
    out.mkdir()
    (out / GATE).touch()
    job_id, folder, log_text = _submit_gated(out, tmp_path, ["--coco_path", str(data_dir), "--epochs",
                                                            str(REQUEUE_EPOCHS)] + JOB + TINY)

    with _cancelled_at_exit(job_id):
        _wait("the end of epoch 0", lambda: _logged_epochs(out) == [0], folder)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        _wait("the requeued run to resume", lambda: re.search(r"\(restart 1\).*?continuing at epoch 1", log_text(),
                                                               re.S), folder)
        _wait("the end of epoch 1", lambda: _logged_epochs(out) == [0, 1], folder)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        _wait("the run requeued by the signal to resume", lambda: re.search(
            r"\(restart 2\).*?continuing at epoch 2", log_text(), re.S), folder)
        (out / GATE).unlink()
        _wait_completed(job_id, folder, restarts=2)
    text = log_text()
    assert "Time limit or preemption: requeuing" in text
    assert [int(e) for e in re.findall(r"continuing at epoch (\d+)", text)] == [1, 2], text
    assert log_epochs(out) == list(range(REQUEUE_EPOCHS))  # each epoch once, none lost
    assert _ckpt_epoch(out / "checkpoint.pth") == REQUEUE_EPOCHS - 1
    assert sorted(p.name for p in folder.glob("*_result.pkl")) == [f"{job_id}_0_result.pkl", f"{job_id}_1_result.pkl"]


# the smallest panoptic model (the mask head needs hidden_dim a multiple of 128 and 8 heads); the dataset's recipe
# sets the rest
PANOPTIC_TINY = ["--dataset_file", "synthetic_panoptic", "--hidden_dim", "128", "--nheads", "8", "--enc_layers", "1",
                 "--dec_layers", "1", "--dim_feedforward", "64", "--num_queries", "8", "--batch_size", "2",
                 "--num_workers", "0", "--warmup_iters", "0", "--lr_drop", "100", "--scales", "64", "--max_size", "80",
                 "--val_size", "64", "--device", "cpu", "--epochs", "2"]


def test_slurm_two_stage_job_requeued_in_each_stage_resumes_that_stage(slurm, data_dir, tmp_path):
    """A 2-task --two_stage job (the synthetic_panoptic default) requeued (`scontrol requeue`) at the end of stage
    1's first epoch, then at the end of stage 2's first epoch: each run resumes the stage it was in from that stage's
    own checkpoint.pth (OUTPUT_DIR/box, then OUTPUT_DIR, into a model with masks), a finished stage 1 is not
    trained again, and the job ends COMPLETED with PQ in log.txt."""
    pytest.importorskip("panopticapi.evaluation", reason="panoptic evaluation needs panopticapi-lite")
    out = tmp_path / "out"
    box = out / "box"
    box.mkdir(parents=True)
    (box / GATE).touch()
    (out / GATE).touch()
    job_id, folder, log_text = _submit_gated(out, tmp_path, ["--coco_path", str(data_dir)] + JOB + PANOPTIC_TINY)

    with _cancelled_at_exit(job_id):
        _wait("the end of stage 1's epoch 0", lambda: _logged_epochs(box) == [0], folder)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        _wait("stage 1 to resume", lambda: re.search(r"\(restart 1\).*?Stage 1: resuming from .*box/checkpoint.pth "
                                                      r"\(epoch 1 of 2 done\)", log_text(), re.S), folder)
        _wait("the end of stage 1's epoch 1", lambda: _logged_epochs(box) == [0, 1], folder)
        box_checkpoint = (box / "checkpoint.pth").stat().st_mtime_ns
        (box / GATE).unlink()
        _wait("the end of stage 2's epoch 0", lambda: _logged_epochs(out) == [0], folder)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        _wait("stage 2 to resume", lambda: re.search(r"\(restart 2\).*?Stage 2: resuming from .*out/checkpoint.pth "
                                                      r"\(epoch 1 of 2 done\)", log_text(), re.S), folder)
        (out / GATE).unlink()
        _wait_completed(job_id, folder, restarts=2)
    text = log_text()
    assert re.search(r"\(restart 2\).*?Stage 1: .*box/checkpoint.pth already reached its last epoch \(1\): not run "
                     r"again", text, re.S), text
    assert (box / "checkpoint.pth").stat().st_mtime_ns == box_checkpoint  # stage 1 was not trained again
    assert log_epochs(box) == [0, 1] and log_epochs(out) == [0, 1]
    last = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert set(last["test_PQ_all"]) == {"pq", "sq", "rq", "n"}
    assert torch.load(out / "checkpoint.pth", weights_only=True)["args"]["masks"]


def test_plain_srun_two_tasks_train(slurm, data_dir, tmp_path):
    """`srun -n 2 python main.py`: ranks from SLURM_PROCID, rendezvous on the first host of the step."""
    out = tmp_path / "out"
    env = dict(clean_environ(), OMP_NUM_THREADS="1")
    proc = subprocess.run(["srun", "-n", "2", "--cpus-per-task", "1", "--kill-on-bad-exit=1", sys.executable,
                           "main.py", "--coco_path", str(data_dir), "--epochs", "1", "--output_dir", str(out)] + TINY,
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distributed init (srun): rank 0 of 2" in proc.stdout and "rank 1 of 2" not in proc.stdout
    assert "effective batch size: 2 (1 per process x 2 processes)" in proc.stdout
    assert log_epochs(out) == [0] and _ckpt_epoch(out / "checkpoint.pth") == 0
