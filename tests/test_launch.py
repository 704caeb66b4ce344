"""Distributed launch: the process group from the environment (torchrun, srun, submitit), backends, errors, the
rank-aware log filter, and real 2-process gloo runs on 127.0.0.1 (training, evaluation, gradient equivalence)."""
import argparse
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import util.dist as udist
import util.logger as ulogger
from datasets.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
# a tiny model, every flag explicit (no dataset defaults), frozen batch norm, no dropout
TINY = ["--dataset_file", "synthetic", "--backbone", "resnet18", "--backbone_weights", "none",
        "--backbone_norm", "frozen_bn", "--backbone_last_layer", "layer4", "--hidden_dim", "32", "--enc_layers", "1",
        "--dec_layers", "1", "--dim_feedforward", "64", "--nheads", "2", "--num_queries", "10", "--dropout", "0",
        "--scales", "64", "--max_size", "80", "--val_size", "64", "--crop_scales", "--num_workers", "0",
        "--device", "cpu", "--lr", "1e-3", "--lr_backbone", "1e-3", "--warmup_iters", "0", "--lr_drop", "100"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_environ() -> dict:
    """This process's environment without any launcher's variables (the test may itself run under Slurm)."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def no_launcher(monkeypatch):
    for k in list(os.environ):
        if k in LAUNCH_VARS or k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_")):
            monkeypatch.delenv(k)
    return monkeypatch


@pytest.fixture
def detr_logging():
    """Removes the handlers of the project's logging (``util.logger.setup_logging``) that a test set up."""
    yield
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_detr", False)]:
        root.removeHandler(h)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=clean_environ(), capture_output=True, text=True, timeout=timeout,
                          **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc


def torchrun(nproc: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch") / "data"
    generate(root, seed=0, num_train=32, num_val=8, image_size=64)
    return root


# -- the environment -> process group ----------------------------------------------------------------------

def test_no_launcher_is_a_single_process(no_launcher):
    assert udist.detect_launch() is None
    args = argparse.Namespace(device="cpu", dist_url="env://")
    udist.init_distributed_mode(args)
    assert args.distributed is False


def test_torchrun_environment(no_launcher):
    for k, v in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="node7", MASTER_PORT="29500").items():
        no_launcher.setenv(k, v)
    assert udist.detect_launch() == udist.LaunchEnv("torchrun", 3, 8, 1, "node7", 29500)


def test_srun_environment_uses_the_first_host_of_the_step_and_a_port_from_the_job_id(no_launcher):
    for k, v in dict(SLURM_PROCID="5", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="8", SLURM_NTASKS="16",
                     SLURM_LOCALID="1", SLURM_JOB_ID="4321", SLURM_STEP_NODELIST="gpu[03-04]",
                     SLURM_JOB_NODELIST="gpu[03-06]").items():
        no_launcher.setenv(k, v)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="gpu03\ngpu04\n", stderr="")
    no_launcher.setattr(udist.subprocess, "run", fake_run)
    launch = udist.detect_launch()
    assert calls == [["scontrol", "show", "hostnames", "gpu[03-04]"]]
    assert launch == udist.LaunchEnv("srun", 5, 8, 1, "gpu03", 10000 + 4321)
    # MASTER_ADDR / MASTER_PORT, when set, win
    no_launcher.setenv("MASTER_ADDR", "10.0.0.1")
    no_launcher.setenv("MASTER_PORT", "12345")
    launch = udist.detect_launch()
    assert (launch.master_addr, launch.master_port) == ("10.0.0.1", 12345)


def test_slurm_batch_script_is_not_a_launch(no_launcher):
    # the batch script of a 2-task job has SLURM_PROCID=0 and SLURM_NTASKS=2 but no step: one process
    for k, v in dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_JOB_ID="7",
                     SLURM_JOB_NODELIST="vm").items():
        no_launcher.setenv(k, v)
    assert udist.detect_launch() is None


def test_submitit_local_environment(no_launcher):
    # what submitit's local executor sets in each task (recorded from a real 2-task job)
    for k, v in dict(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="12171", SUBMITIT_LOCAL_NTASKS="2",
                     SUBMITIT_LOCAL_GLOBALID="1", SUBMITIT_LOCAL_LOCALID="1", SUBMITIT_LOCAL_NODEID="0",
                     SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_FOLDER="/tmp/x/%j").items():
        no_launcher.setenv(k, v)
    assert udist.detect_launch() == udist.LaunchEnv("submitit-local", 1, 2, 1, "127.0.0.1", 10000 + 12171 % 20000)


def test_submitit_slurm_environment(no_launcher):
    for k, v in dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="42", SLURM_NTASKS="4", SLURM_PROCID="2",
                     SLURM_LOCALID="0", SLURM_NODEID="1", SLURM_JOB_NUM_NODES="2", SLURM_STEP_ID="0",
                     SLURM_JOB_NODELIST="node[1-2]", SUBMITIT_FOLDER="/tmp/x/%j").items():
        no_launcher.setenv(k, v)
    assert udist.detect_launch() == udist.LaunchEnv("submitit-slurm", 2, 4, 0, "node1", 10042)


def test_missing_master_addr_is_a_clear_error(no_launcher):
    no_launcher.setenv("RANK", "0")
    no_launcher.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="without MASTER_ADDR: set MASTER_ADDR and MASTER_PORT"):
        udist.init_distributed_mode(argparse.Namespace(device="cpu", dist_url="env://", dist_backend="auto"))


def test_backend_choice():
    assert udist.choose_backend("auto", "cpu") == "gloo"
    assert udist.choose_backend("gloo", "cpu") == "gloo"
    if not torch.cuda.is_available():
        assert udist.choose_backend("auto", "cuda") == "gloo"
        with pytest.raises(SystemExit, match="--dist_backend nccl needs CUDA"):
            udist.choose_backend("nccl", "cpu")


def test_gpu_of_each_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert udist.cuda_device_for(3) == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1: one GPU per task
    assert udist.cuda_device_for(3) == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit, match="local rank 3 but only 2 GPUs visible"):
        udist.cuda_device_for(3)


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
@pytest.mark.parametrize("gpus,expected", [(2, 1), (1, 0)])  # 1: srun --gpus-per-task=1 shows each task its own
def test_every_backend_on_cuda_selects_the_local_ranks_gpu(no_launcher, backend, gpus, expected):
    # rank 1 of 2 on one node: the model (moved to "cuda", the current device) must land on the GPU that DDP's
    # device_ids=[args.gpu] names, whatever the backend (no GPU needed: torch.cuda is mocked)
    for k, v in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999").items():
        no_launcher.setenv(k, v)
    selected, groups = [], []
    no_launcher.setattr(torch.cuda, "is_available", lambda: True)
    no_launcher.setattr(torch.cuda, "device_count", lambda: gpus)
    no_launcher.setattr(torch.cuda, "set_device", selected.append)
    no_launcher.setattr(udist.dist, "init_process_group", lambda **kw: groups.append(kw))
    no_launcher.setattr(udist, "barrier", lambda: None)
    args = argparse.Namespace(device="cuda", dist_url="env://", dist_backend=backend, dist_timeout=1.0)
    udist.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.dist_backend) == (True, 1, 2, backend)
    assert args.gpu == expected and selected == [expected]
    assert groups and groups[0]["backend"] == backend and groups[0]["rank"] == 1


def test_init_and_destroy_a_one_process_gloo_group(no_launcher):
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        no_launcher.setenv(k, v)
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    args = argparse.Namespace(device="cpu", dist_url="env://", dist_backend="auto", dist_timeout=1.0)
    udist.init_distributed_mode(args)
    try:
        assert (args.distributed, args.rank, args.world_size, args.dist_backend) == (True, 0, 1, "gloo")
        assert dist.is_initialized() and udist.get_world_size() == 1
        udist.barrier()
    finally:
        udist.destroy_distributed()
    assert not dist.is_initialized()
    udist.destroy_distributed()  # a no-op when nothing is initialised


def test_info_from_rank_0_only_and_warnings_from_every_rank(no_launcher, detr_logging, capsys):
    """Before the process group exists (no group in this test process) the rank is the launcher's."""
    log = logging.getLogger("detr.test_launch")
    ulogger.setup_logging()  # onto pytest's captured stdout
    no_launcher.setenv("WORLD_SIZE", "2")
    no_launcher.setenv("RANK", "1")
    log.info("chatter from rank 1")
    log.warning("trouble on rank 1")
    no_launcher.setenv("RANK", "0")
    log.info("chatter from rank 0")
    log.error("trouble on rank 0")
    no_launcher.delenv("RANK")
    no_launcher.delenv("WORLD_SIZE")
    log.warning("alone")
    for k, v in dict(SLURM_PROCID="1", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2").items():  # srun, submitit
        no_launcher.setenv(k, v)
    log.info("chatter from Slurm task 1")
    no_launcher.setenv("SLURM_PROCID", "0")
    log.info("chatter from Slurm task 0")
    out = capsys.readouterr().out.splitlines()
    assert out == ["[rank 1] trouble on rank 1", "chatter from rank 0", "[rank 0] trouble on rank 0", "alone",
                   "chatter from Slurm task 0"]


def test_once_records_and_the_log_file(no_launcher, detr_logging, capsys, tmp_path):
    """A record marked ``once`` is said the first time only (on the console and in the file); a ``file_only`` one
    goes to the log file, not the console; the log file is rank 0's and gets each line with its time."""
    log = logging.getLogger("detr.test_launch")
    ulogger.setup_logging()
    with ulogger.log_to_file(tmp_path / "console.log"):
        for _ in range(3):
            log.info("Using the data in %s", "/data", extra={"once": True})
        log.info("Using the data in %s", "/other", extra={"once": True})
        log.info("every argument", extra={"file_only": True})
        log.info("a metric line")
    log.info("after the run")  # the file is no longer written
    no_launcher.setenv("WORLD_SIZE", "2")
    no_launcher.setenv("RANK", "1")
    with ulogger.log_to_file(tmp_path / "rank1.log"):
        log.warning("trouble on rank 1")
    out = capsys.readouterr().out.splitlines()
    assert out == ["Using the data in /data", "Using the data in /other", "a metric line", "after the run",
                   "[rank 1] trouble on rank 1"]
    lines = (tmp_path / "console.log").read_text().splitlines()
    assert [line[20:] for line in lines] == ["Using the data in /data", "Using the data in /other", "every argument",
                                             "a metric line"]
    assert all(line[4] == "-" and line[13] == ":" for line in lines)  # 2026-01-31 12:00:00 message
    assert not (tmp_path / "rank1.log").exists()


def test_messages_before_the_process_group_come_once_per_job(data_dir, tmp_path):
    """2 processes (torchrun) of a --two_stage run: its stage messages, logged before each stage's process group
    exists, and the distributed init message appear once in the job's output, not once per process (the stages'
    training is stubbed out: only the group is formed)."""
    script = tmp_path / "stub_stages.py"
    script.write_text("import sys, main\n"
                      "main.run = lambda args: {}\n"
                      "main.main(main.parse_args(sys.argv[1:]))\n")
    proc = run(torchrun(2) + [str(script)] + TINY + ["--dataset_file", "synthetic_panoptic", "--two_stage",
                                                     "--hidden_dim", "128", "--nheads", "8", "--coco_path",
                                                     str(data_dir), "--output_dir", str(tmp_path / "out")])
    out = proc.stdout
    assert out.count("Two stages: 1. the box model into") == 1, out
    assert out.count("Stage 2: the mask head on the frozen box model") == 1, out
    assert out.count("distributed init (torchrun): rank 0 of 2") == 1, out  # one group for both stages
    assert "rank 1 of 2" not in out, out


def test_a_failing_rank_stops_the_other_instead_of_hanging(tmp_path):
    """Rank 1 raises before a collective; rank 0, waiting in it, must fail with an error instead of hanging (gloo
    notices the closed connection; the --dist_timeout of 1 minute bounds the wait in any case; the test's own
    timeout only guards against a hang, it measures no speed)."""
    script = ("import argparse, torch, torch.distributed as dist\n"
              "from util.dist import init_distributed_mode, get_rank\n"
              "args = argparse.Namespace(device='cpu', dist_url='env://', dist_backend='auto', dist_timeout=1.0)\n"
              "init_distributed_mode(args)\n"
              "if get_rank() == 1:\n"
              "    raise RuntimeError('rank 1 fails on purpose')\n"
              "for _ in range(3):\n"
              "    dist.all_reduce(torch.ones(1))\n")
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(clean_environ(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert procs[1].returncode != 0 and "rank 1 fails on purpose" in outs[1]
    assert procs[0].returncode != 0, outs[0]


# -- real 2-process runs -----------------------------------------------------------------------------------

def test_torchrun_two_processes_train_then_eval_equals_one_process(data_dir, tmp_path):
    """torchrun with 2 processes trains one epoch (one checkpoint, one log line); a 2-process --eval --resume of
    it gives exactly the numbers (and precision/recall arrays) of a 1-process one, both with batch 1."""
    train_dir = tmp_path / "train"
    common = ["main.py"] + TINY + ["--coco_path", str(data_dir), "--batch_size", "1"]
    proc = run(torchrun(2) + common + ["--epochs", "1", "--output_dir", str(train_dir)])
    assert "effective batch size: 2 (1 per process x 2 processes)" in proc.stdout
    assert sorted(p.name for p in train_dir.iterdir()) == ["args.json", "checkpoint.pth", "console.log", "eval",
                                                           "log.txt", "tensorboard"]  # rank 0's only
    assert len(list((train_dir / "tensorboard").iterdir())) == 1
    lines = (train_dir / "log.txt").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 0
    assert torch.load(train_dir / "checkpoint.pth", weights_only=True)["epoch"] == 0

    ckpt = str(train_dir / "checkpoint.pth")
    run(torchrun(2) + common + ["--eval", "--resume", ckpt, "--output_dir", str(tmp_path / "eval2")])
    run([sys.executable] + common + ["--eval", "--resume", ckpt, "--output_dir", str(tmp_path / "eval1")])
    two = torch.load(tmp_path / "eval2" / "eval.pth", weights_only=True)
    one = torch.load(tmp_path / "eval1" / "eval.pth", weights_only=True)
    assert len(one["stats"]) == 12
    assert max(one["stats"]) > 0, "the tiny model detects nothing: the comparison would be vacuous"
    assert two["stats"] == one["stats"]
    for key in ("precision", "recall", "scores"):
        assert torch.equal(two[key], one[key]), key


def test_two_processes_of_batch_1_step_like_one_process_of_batch_2(data_dir, tmp_path):
    """One training step (project's model, criterion, optimizer and train_one_epoch) on two images of the same
    size and object count: DDP with 2 x 1 image gives the gradients and updated weights of 1 x 2 images."""
    script = str(REPO / "tests" / "dist_one_step.py")
    run([sys.executable, script, "--coco_path", str(data_dir), "--out", str(tmp_path / "one.pth")])
    run(torchrun(2) + [script, "--coco_path", str(data_dir), "--out", str(tmp_path / "two.pth")])
    one = torch.load(tmp_path / "one.pth", weights_only=True)
    two = torch.load(tmp_path / "two.pth", weights_only=True)
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["image_ids"] == two["image_ids"]
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 20
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)
    for name, p in one["params"].items():
        if p.is_floating_point():
            assert (two["params"][name] - p).abs().max() <= 1e-5, name
    # and the step did move the weights, by far more than that tolerance
    moved = max((one["params"][n] - one["before"][n]).abs().max().item() for n in one["grads"])
    assert moved > 5e-5
