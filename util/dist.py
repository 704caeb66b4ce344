"""torch.distributed helpers. Everything degrades to a single process when dist is not initialised."""
import contextlib
import logging
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


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
        dist.barrier()
    yield
    if is_local_main_process():
        dist.barrier()


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


def init_distributed_mode(args) -> None:
    """Initialise the default process group from the launcher's environment, as the original did.

    Sets ``args.distributed``, ``args.rank``, ``args.gpu`` and ``args.dist_backend``; NCCL on CUDA, gloo on CPU.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.gpu = args.rank % max(torch.cuda.device_count(), 1)
    else:
        logger.info("Not using distributed mode")
        args.distributed = False
        return
    args.distributed = True
    use_cuda = str(args.device).startswith("cuda") and torch.cuda.is_available()
    args.dist_backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    logger.info("distributed init (rank %d): %s", args.rank, args.dist_url)
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank)
    dist.barrier()
