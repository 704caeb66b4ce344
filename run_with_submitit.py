"""Train DETR as a Slurm job (one or more nodes) or as several local processes, through submitit.

Every flag of main.py is accepted and passed on to ``main.main``; the flags below choose the job. Run from the
repository root; the job folder (logs, submitit files, and checkpoints unless --output_dir says otherwise)
defaults to ``./runs/submitit/<job id>`` (or ``$DETR_JOB_DIR/<job id>``).

    # COCO on 2 nodes x 8 GPUs, 3-day time limit, on partition "gpu"
    python run_with_submitit.py --nodes 2 --ngpus 8 --timeout 4320 --partition gpu \\
        --coco_path /data/coco --job_dir /shared/$USER/detr/%j

    # the same with an account, a QoS and a node constraint of your cluster
    python run_with_submitit.py --nodes 2 --ngpus 8 --timeout 4320 --partition gpu --account myproj \\
        --qos normal --constraint a100 --coco_path /data/coco --output_dir /shared/$USER/detr/r50

    # the synthetic job on one CPU node with 2 processes (e.g. the cluster of .ci/slurm-up)
    python run_with_submitit.py --nodes 1 --ngpus 2 --device cpu --cpus_per_task 1 --mem_gb 0 \\
        --dataset_file synthetic --output_dir runs/synthetic-slurm

    # no Slurm: the same multi-process job on this machine (waits for it to finish)
    python run_with_submitit.py --cluster local --ngpus 2 --device cpu --dataset_file synthetic

Timeouts and preemption: submitit asks Slurm for a USR2 signal 90 s before the time limit; the job then requeues
itself (same job id, same folder) and, like a job requeued by the cluster (`scontrol requeue`, preemption), the
new run resumes from the ``checkpoint.pth`` in its output folder (written atomically at the end of each epoch)
and continues the epoch count (a --two_stage run resumes the stage it was in, from OUTPUT_DIR/box or OUTPUT_DIR,
and does not rerun a finished stage). Up to 30 timeouts per job.
"""
import argparse
import copy
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Optional

import submitit
import torch

REPO_DIR = str(Path(__file__).resolve().parent)
if REPO_DIR not in sys.path:
    sys.path.insert(0, REPO_DIR)

from util import args as arguments  # noqa: E402
from util.args import HelpFormatter, get_args_parser  # noqa: E402
from util.logger import setup_logging  # noqa: E402
from util.two_stage import two_stages_apply  # noqa: E402

logger = logging.getLogger("detr")

# the original allowed 30 requeues after a timeout (300 epochs on COCO do not fit a usual time limit)
MAX_NUM_TIMEOUT = 30


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Submitit for DETR", parents=[get_args_parser()], formatter_class=HelpFormatter)
    group = parser.add_argument_group("job")
    group.add_argument("--ngpus", default=8, type=int,
                       help="processes per node: one per GPU (with --device cpu, CPU processes)")
    group.add_argument("--nodes", default=None, type=int,
                       help="number of nodes (default: 4 on Slurm, as the original; 1 with --cluster local/debug)")
    group.add_argument("--timeout", default=60, type=int,
                       help="time limit of each run of the job, in minutes (the job requeues itself before it)")
    group.add_argument("--job_dir", default="", type=str,
                       help="job folder (submitit files, logs, and checkpoints without --output_dir); %%j is the "
                            "job id; default $DETR_JOB_DIR/%%j, else ./runs/submitit/%%j")
    group.add_argument("--cluster", default="slurm", choices=("slurm", "local", "debug"),
                       help="slurm: submit with sbatch; local: run the tasks as processes of this machine "
                            "(no Slurm needed; waits for the job); debug: one process, in this one")
    group.add_argument("--partition", default=None, type=str, help="Slurm partition (default: the cluster's)")
    group.add_argument("--account", default=None, type=str, help="Slurm account to charge")
    group.add_argument("--qos", default=None, type=str, help="Slurm quality of service")
    group.add_argument("--constraint", default=None, type=str, help="Slurm node constraint (features)")
    group.add_argument("--exclude", default=None, type=str, help="Slurm nodes to avoid (node list)")
    group.add_argument("--use_volta32", action="store_true",
                       help="add the constraint 'volta32gb' (32 GB V100s, as on the original's cluster)")
    group.add_argument("--comment", default=None, type=str, help="comment passed to the scheduler")
    group.add_argument("--cpus_per_task", default=10, type=int, help="CPUs per process (data loading workers)")
    group.add_argument("--mem_gb", default=None, type=int,
                       help="memory per node in GB (default 40 per process, as the original; 0: the cluster's "
                            "default)")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Also records which flags were given (``args.explicit_flags``), as main.py does: the dataset's recipe fills
    the others, and a requeued job's flags override its checkpoint only where the user set them."""
    args = arguments.parse_args(sys.argv[1:] if argv is None else argv, parser=get_parser())
    if args.nodes is None:
        args.nodes = 4 if args.cluster == "slurm" else 1
    return args


def default_job_dir() -> str:
    base = os.environ.get("DETR_JOB_DIR")
    if not base:
        return str(Path("runs/submitit/%j").resolve())
    return str(Path(base if "%j" in base else os.path.join(base, "%j")).resolve())


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` and write a file into it; a clear error otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise SystemExit(f"{what} {folder} is not writable from {socket.gethostname()} ({e.strerror or e}); "
                         "choose another folder (--output_dir / --job_dir, or $DETR_JOB_DIR)") from e


def _static_part(path: str) -> Path:
    """The part of a folder template before the first %j (the part that can be checked before submission)."""
    return Path(path.split("%j", 1)[0]) if "%j" in path else Path(path)


class Trainer(submitit.helpers.Checkpointable):
    """The job: every task calls ``main.main`` with the same arguments; the process group comes from submitit's
    environment (rank, world size, first node of the job; see util.dist.init_distributed_mode)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self) -> dict:
        if REPO_DIR not in sys.path:
            sys.path.insert(0, REPO_DIR)
        import main as detection

        setup_logging()
        if "OMP_NUM_THREADS" not in os.environ:
            # as torchrun does: without a limit every process spins one thread per core of the node, and on CPU
            # the processes of a node then slow each other down many times over
            torch.set_num_threads(self.args.cpus_per_task)
        args = copy.deepcopy(self.args)  # main.main changes its args; a requeue starts from the submitted ones
        job = submitit.JobEnvironment()
        # the job folder as submitit names it (the debug executor does not export SUBMITIT_FOLDER)
        args.output_dir = (args.output_dir or args.job_dir).replace("%j", str(job.job_id))
        output_dir = Path(args.output_dir)
        check_writable(output_dir, "the output folder")
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        logger.info("Job %s, task %d of %d on %s (restart %s); output folder %s", job.job_id, job.global_rank,
                    job.num_tasks, job.hostname, restarts, output_dir)
        resume_from_own_checkpoint(args, output_dir)
        return detection.main(args)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 when the time limit nears (or on preemption with USR2): requeue the same
        job; its next run resumes from the output folder's checkpoint.pth (end of the last complete epoch)."""
        logger.warning("Time limit or preemption: requeuing; the next run resumes from the last checkpoint.pth")
        return submitit.helpers.DelayedSubmission(type(self)(self.args))


def resume_from_own_checkpoint(args: argparse.Namespace, output_dir: Path) -> None:
    """A (re)started training job continues from the checkpoint.pth of its output folder when there is one."""
    own = output_dir / "checkpoint.pth"
    if args.eval:
        return
    if is_two_stage_run(args):
        logger.info("Two stages: each stage resumes from its own folder's checkpoint.pth (%s/box, then %s) and a "
                    "finished stage is not run again", output_dir, output_dir)
        return
    if not own.exists():
        return
    if args.resume and Path(args.resume) != own:
        logger.warning("The output folder already holds %s: resuming from it instead of --resume %s", own,
                       args.resume)
    if getattr(args, "finetune", ""):
        logger.info("Resuming from %s, which already holds the fine-tuned weights: --finetune %s not used", own,
                    args.finetune)
        args.finetune = ""
    args.resume = str(own)
    logger.info("Resuming from %s (the output folder's last checkpoint)", own)


def is_two_stage_run(args: argparse.Namespace) -> bool:
    """Whether ``main.main`` will train both stages of --two_stage (asked for, or the dataset's default)."""
    from datasets.recipes import apply_dataset_recipe  # in the job only, as ``main``: submitting needs no datasets

    probe = copy.deepcopy(args)
    apply_dataset_recipe(probe)
    return two_stages_apply(probe)


def build_executor(args: argparse.Namespace) -> submitit.AutoExecutor:
    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        raise SystemExit("--cluster slurm: `sbatch` is not on PATH (not a Slurm login node?); use --cluster local "
                         "to run the same job as processes of this machine")
    if args.cluster == "debug" and (args.ngpus != 1 or args.nodes != 1):
        logger.warning("--cluster debug runs one process in this one: --ngpus %d --nodes %d not used", args.ngpus,
                       args.nodes)
        args.ngpus, args.nodes = 1, 1
    if args.cluster == "local" and args.nodes != 1:
        raise SystemExit(f"--cluster local runs on this machine only: use --nodes 1 (got {args.nodes})")
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster=args.cluster,
                                     slurm_max_num_timeout=MAX_NUM_TIMEOUT)
    use_gpus = str(args.device).startswith("cuda")
    params = dict(name="detr", nodes=args.nodes, tasks_per_node=args.ngpus, cpus_per_task=args.cpus_per_task,
                  timeout_min=args.timeout)
    if use_gpus:
        params["gpus_per_node"] = args.ngpus
    mem_gb = 40 * args.ngpus if args.mem_gb is None else args.mem_gb
    if mem_gb > 0:
        params["mem_gb"] = mem_gb
    constraints = [c for c in (args.constraint, "volta32gb" if args.use_volta32 else None) if c]
    slurm = dict(partition=args.partition, account=args.account, qos=args.qos, exclude=args.exclude,
                 comment=args.comment, constraint="&".join(constraints) or None,
                 # one task that fails ends the whole step instead of leaving the others waiting in a collective
                 srun_args=["--kill-on-bad-exit=1"])
    params.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
    executor.update_parameters(**params)
    return executor


def main(argv: Optional[list[str]] = None) -> submitit.Job:
    setup_logging()
    args = parse_args(argv)
    if args.ngpus < 1 or args.nodes < 1:
        raise SystemExit(f"--ngpus and --nodes must be at least 1 (got {args.ngpus} and {args.nodes})")
    if args.timeout < 3 and args.cluster == "slurm":
        # Slurm sends the USR2 warning 90 s before the limit, up to 60 s early: sooner than submitit can catch it
        raise SystemExit(f"--timeout {args.timeout}: use at least 3 minutes (the requeue signal comes 90 s before "
                         "the limit)")
    args.job_dir = str(Path(args.job_dir).resolve()) if args.job_dir else default_job_dir()
    check_writable(_static_part(args.job_dir), "the job folder")
    if args.output_dir:
        args.output_dir = str(Path(args.output_dir).resolve())
        check_writable(_static_part(args.output_dir), "the output folder")

    executor = build_executor(args)
    # the job unpickles Trainer, which imports this repository's modules, wherever it was submitted from
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_DIR, os.environ.get("PYTHONPATH")) if p)
    job = executor.submit(Trainer(args))
    world = args.ngpus * args.nodes
    logger.info("Submitted job %s (%s): %d node(s) x %d process(es); effective batch size %d (%d per process x "
                "%d)", job.job_id, args.cluster, args.nodes, args.ngpus, args.batch_size * world, args.batch_size,
                world)
    logger.info("Job folder: %s", str(job.paths.folder))
    logger.info("Output folder: %s", args.output_dir.replace("%j", str(job.job_id)) if args.output_dir
                else job.paths.folder)
    if args.cluster != "slurm":
        # local and debug jobs run on this machine: wait, and fail loudly if a task failed
        job.results()
        logger.info("Job %s finished", job.job_id)
    return job


if __name__ == "__main__":
    main()
