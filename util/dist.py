"""torch.distributed helpers. Everything degrades to a single process when dist is not initialised.

``init_distributed_mode`` builds the process group from whatever launched the process:

- ``torchrun`` / ``python -m torch.distributed.launch --use_env``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT;
- a submitit job (``run_with_submitit.py``, Slurm or ``--cluster local``): submitit's ``JobEnvironment``;
- a plain ``srun`` step: SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), SLURM_LOCALID, the first host of
  the step's node list (``scontrol show hostnames``).

Under Slurm and submitit the rendezvous is the first node of the job on a port derived from the job id (so two
jobs sharing a node do not collide); MASTER_ADDR / MASTER_PORT, when set, take precedence. NCCL on CUDA, gloo on
CPU (``--dist_backend`` forces one), and every collective times out after ``--dist_timeout`` minutes so that a
rank that died or hangs stops the job with an error instead of blocking the others forever.
"""
import contextlib
import datetime
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MIN = 30.0


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def launch_rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes: the process group's once it exists; before it, the
    launcher's (torchrun's RANK / WORLD_SIZE, submitit's local executor, SLURM_PROCID under srun or submitit on
    Slurm), so that what is logged before ``init_distributed_mode`` is also logged once per job; (0, 1) alone."""
    if is_dist_avail_and_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", 1))
    if "SUBMITIT_LOCAL_GLOBALID" in env:
        return int(env["SUBMITIT_LOCAL_GLOBALID"]), int(env.get("SUBMITIT_LOCAL_NTASKS", 1))
    if "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    return 0, 1


def barrier() -> None:
    """``dist.barrier()`` that names this process's GPU on NCCL (torch otherwise guesses it and warns)."""
    if not is_dist_avail_and_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def get_local_rank() -> int:
    """This process's rank on its node (LOCAL_RANK from torchrun, SLURM_LOCALID under srun; 0 otherwise)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if name in os.environ and is_dist_avail_and_initialized():
            return int(os.environ[name])
    return 0


def is_local_main_process() -> bool:
    return get_local_rank() == 0


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Run the enclosed block on the main process of each node first, the node's other processes after it (e.g.
    to generate or download files once per node, then read them everywhere). Without torch.distributed: just runs."""
    if not is_dist_avail_and_initialized():
        yield
        return
    if not is_local_main_process():
        barrier()
    yield
    if is_local_main_process():
        barrier()


def save_on_master(obj: Any, f: Any, **kwargs) -> None:
    """``torch.save`` on the main process only (the original's helper). A path is written atomically."""
    if not is_main_process():
        return
    if isinstance(f, (str, os.PathLike)):
        from util.checkpoint import save_checkpoint

        save_checkpoint(obj, os.fspath(f))
    else:
        torch.save(obj, f, **kwargs)


def all_gather(data: Any) -> list[Any]:
    """Gather any picklable object from every process; a one-element list without dist."""
    if get_world_size() == 1:
        return [data]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, data)
    return out


@torch.no_grad()
def reduce_dict(input_dict: dict[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """All-reduce a dict of scalar tensors (same keys on every process); averages by default."""
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    names = sorted(input_dict.keys())
    values = torch.stack([input_dict[k] for k in names])
    dist.all_reduce(values)
    if average:
        values /= world_size
    return dict(zip(names, values))


@dataclass
class LaunchEnv:
    """Where this process sits in a multi-process launch, as read from the environment."""
    launcher: str  # "torchrun", "submitit-slurm", "submitit-local", "srun"
    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str]
    master_port: Optional[int]


def port_from_job_id(job_id: str) -> int:
    """A rendezvous port for a Slurm / submitit job: 10000-29999 (below Linux's ephemeral ports), a function of
    the job id so that every task of the job agrees on it and two jobs on one node rarely share it."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 10000 + int(digits) % 20000


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                             text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot expand the Slurm node list {nodelist!r} with `scontrol show hostnames` ({e}); "
                           "set MASTER_ADDR to the host name of the job's first node") from e
    if not out:
        raise RuntimeError(f"`scontrol show hostnames {nodelist}` printed nothing; set MASTER_ADDR")
    return out[0]


def _env_master(default_addr: Optional[str], default_port: Optional[int]) -> tuple[Optional[str], Optional[int]]:
    addr = os.environ.get("MASTER_ADDR") or default_addr
    port = os.environ.get("MASTER_PORT")
    return addr, int(port) if port else default_port


def detect_launch() -> Optional[LaunchEnv]:
    """The multi-process launch this process belongs to, or None for a single process (not launched by
    torchrun, not a multi-task submitit job, not a multi-task srun step)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        addr, port = _env_master(None, None)
        return LaunchEnv("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         addr, port)
    if env.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):
        import submitit  # only needed inside submitit jobs

        job = submitit.JobEnvironment()
        if job.num_tasks < 2:
            return None
        # the local executor runs every task on this machine
        first = job.hostnames[0] if job.cluster == "slurm" else "127.0.0.1"
        addr, port = _env_master(first, port_from_job_id(job.raw_job_id))
        return LaunchEnv(f"submitit-{job.cluster}", job.global_rank, job.num_tasks, job.local_rank, addr, port)
    # a task of an srun step (the batch script itself also has SLURM_PROCID=0 but no step id)
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        world_size = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        if world_size < 2:
            return None
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_STEP_NODELIST")
                                                           or env["SLURM_JOB_NODELIST"])
        addr, port = _env_master(addr, port_from_job_id(env["SLURM_JOB_ID"]))
        return LaunchEnv("srun", int(env["SLURM_PROCID"]), world_size, int(env.get("SLURM_LOCALID", 0)), addr, port)
    return None


def choose_backend(requested: str, device: str) -> str:
    """'auto': NCCL when training on CUDA, else gloo. 'nccl' without CUDA is an error."""
    use_cuda = str(device).startswith("cuda")
    if requested == "auto":
        return "nccl" if use_cuda and torch.cuda.is_available() else "gloo"
    if requested == "nccl":
        if not torch.cuda.is_available():
            raise SystemExit("--dist_backend nccl needs CUDA, and torch sees no GPU here: use --dist_backend gloo "
                             "(or auto) to train on CPU")
        if not use_cuda:
            raise SystemExit(f"--dist_backend nccl with --device {device}: NCCL only moves CUDA tensors; use "
                             "--device cuda or --dist_backend gloo")
    elif requested != "gloo":
        raise SystemExit(f"--dist_backend {requested!r}: expected auto, nccl or gloo")
    return requested


def cuda_device_for(local_rank: int) -> int:
    """This process's GPU: the one of its local rank, or the only one it sees (``srun --gpus-per-task=1`` and
    similar give every task its own CUDA_VISIBLE_DEVICES)."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local_rank >= count:
        raise SystemExit(f"local rank {local_rank} but only {count} GPUs visible to this process: start at most one "
                         "process per GPU (--ngpus / --nproc_per_node / --ntasks-per-node)")
    return local_rank


def init_distributed_mode(args) -> None:
    """Initialise the default process group from the launcher's environment (see the module docstring).

    Reads ``args.device``, ``args.dist_url`` and, when present, ``args.dist_backend`` (auto|nccl|gloo) and
    ``args.dist_timeout`` (minutes). Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu``
    (this process's GPU: its local rank, or 0 when it sees a single GPU) and ``args.dist_backend`` (the backend
    used). With ``--device cuda`` it selects the GPU ``args.gpu``, whatever the backend.
    """
    launch = detect_launch()
    if launch is None:
        logger.info("Not using distributed mode")
        args.distributed = False
        return
    args.distributed = True
    args.rank, args.world_size, args.gpu = launch.rank, launch.world_size, launch.local_rank
    backend = choose_backend(getattr(args, "dist_backend", "auto") or "auto", args.device)
    args.dist_backend = backend

    if args.dist_url == "env://":
        if not launch.master_addr:
            raise SystemExit(f"distributed launch ({launch.launcher}: RANK={launch.rank}, "
                             f"WORLD_SIZE={launch.world_size}) without MASTER_ADDR: set MASTER_ADDR and MASTER_PORT "
                             "to the address and a free port of the rank-0 host (torchrun sets both)")
        if launch.master_port is None:
            raise SystemExit(f"distributed launch ({launch.launcher}) without MASTER_PORT: set it to a free port of "
                             f"the rank-0 host {launch.master_addr}")
        # init_method env:// and other libraries read these
        os.environ.update(MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port),
                          RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank))
    where = f"{launch.master_addr}:{launch.master_port}" if args.dist_url == "env://" else args.dist_url

    kwargs: dict[str, Any] = {}
    if str(args.device).startswith("cuda") and torch.cuda.is_available():
        # on every backend (gloo too): the model goes to the current device and DDP to device_ids=[args.gpu]
        args.gpu = cuda_device_for(launch.local_rank)
        torch.cuda.set_device(args.gpu)
    if is_dist_avail_and_initialized():  # the group of an enclosing run (both stages of --two_stage): joined
        args.dist_backend = dist.get_backend()
        return
    if backend == "nccl":
        # a failed or stuck rank aborts the others' collectives (after the timeout) instead of hanging them
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        kwargs["device_id"] = torch.device("cuda", args.gpu)
    timeout_min = float(getattr(args, "dist_timeout", None) or DEFAULT_TIMEOUT_MIN)
    logger.info("distributed init (%s): rank %d of %d, local rank %d, backend %s, rendezvous %s, timeout %g min",
                launch.launcher, launch.rank, launch.world_size, launch.local_rank, backend, where, timeout_min)
    dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=launch.world_size,
                            rank=launch.rank, timeout=datetime.timedelta(minutes=timeout_min), **kwargs)
    barrier()


@contextlib.contextmanager
def process_group(args) -> Iterator[None]:
    """The default process group for the block (``init_distributed_mode``), torn down at its end by the run that
    created it, after every process has finished it (not on errors: a barrier would wait for the failed rank). A
    run inside another's block joins the existing group: both stages of --two_stage share one, since a second group
    in the same processes would find the first one's addresses in torchrun's store, which outlives it, and its
    ranks could connect to ports already closed."""
    owner = not is_dist_avail_and_initialized()
    init_distributed_mode(args)
    if not owner:
        yield
        return
    try:
        yield
        # every process done before any tears down its group: a 2-process gloo test once aborted (SIGABRT) in the
        # rank that left the last collective first
        barrier()
    finally:
        destroy_distributed()


def destroy_distributed() -> None:
    """Tear down the default process group (call once at the end of training / evaluation)."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def wait_at_test_gate(output_dir: Path) -> None:
    """Test-only: with $DETR_TEST_GATE=NAME, every process waits at the end of each epoch (checkpoint and log line
    written) while OUTPUT_DIR/NAME exists, so that a test holds a job at a point it controls (e.g. to requeue it)
    instead of counting on how long epochs take."""
    name = os.environ.get("DETR_TEST_GATE")
    while name and (output_dir / name).exists():
        time.sleep(0.2)
