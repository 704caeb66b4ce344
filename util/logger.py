"""Console logging (info from rank 0, warnings and errors from every rank), the run's log file, what a run logs at
start, and the smoothed training meters behind the console metric lines.

Two ``extra`` keys of a log record steer where it goes: ``file_only`` (the log file, not the console: e.g. the full
arguments and every averaged loss) and ``once`` (said once per process, however often it is logged: e.g. the
dataset folder, which every split's build reports).
"""
import contextlib
import datetime
import logging
import sys
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from util import args as arguments
from util.dist import all_gather, get_world_size, launch_rank_and_world_size

logger = logging.getLogger(__name__)


class _RankFilter(logging.Filter):
    """Info and debug records from rank 0 only; warnings and errors from every rank, and with several processes
    they say which rank they come from ("[rank 1] ..."). Before the process group exists the rank is the
    launcher's (``launch_rank_and_world_size``): what a job logs before ``init_distributed_mode`` (e.g. the stages of
    --two_stage) also comes once per job."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank, world_size = launch_rank_and_world_size()
        loud = record.levelno >= logging.WARNING
        record.rank_prefix = f"[rank {rank}] " if loud and world_size > 1 else ""
        return rank == 0 or loud


class _ConsoleFilter(logging.Filter):
    """Leaves out the records meant for the log file only (``extra={"file_only": True}``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


class _OnceFilter(logging.Filter):
    """A record logged with ``extra={"once": True}`` passes the first time its message is seen in this process."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "once", False) or getattr(record, "_first_time", False):
            return True  # (the same record reaching a second handler, e.g. the log file)
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        record._first_time = True
        return True


_ONCE = _OnceFilter()  # one memory for every handler and every setup_logging() of the process


def setup_logging(level: int = logging.INFO) -> None:
    """Plain messages on stdout: everything from rank 0, warnings and errors from every rank (not the records
    meant for the log file only; see ``log_to_file``)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_detr", False) == "console":
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(rank_prefix)s%(message)s"))
    handler.addFilter(_RankFilter())
    handler.addFilter(_ConsoleFilter())
    handler.addFilter(_ONCE)
    handler._detr = "console"
    root.addHandler(handler)
    root.setLevel(level)


class _MainRankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = ""
        return launch_rank_and_world_size()[0] == 0


@contextlib.contextmanager
def log_to_file(path: Optional[Path]) -> Iterator[None]:
    """While in the block, rank 0 also appends what it logs to ``path`` (e.g. OUTPUT_DIR/console.log), each line
    with its time, including the records meant for the log file only (the full arguments, every averaged loss).
    Nothing when ``path`` is None or on the other ranks. A resumed run appends to the same file."""
    if path is None or launch_rank_and_world_size()[0] != 0:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_MainRankFilter())
    handler.addFilter(_ONCE)
    handler._detr = "file"
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def setup_for_distributed(is_master: bool) -> None:
    """The original's helper, for users' scripts: silences ``print`` on processes other than the master (a
    ``print(..., force=True)`` still prints) and sets up this project's rank-0 logging. The project itself logs
    through ``logging`` and does not use it."""
    import builtins

    builtin_print = getattr(builtins.print, "_detr_original", builtins.print)

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    print._detr_original = builtin_print
    builtins.print = print
    setup_logging()


def log_start(args, model: torch.nn.Module) -> None:
    """What a run derived before it starts: the flags a dataset recipe or a resumed checkpoint filled in, the number
    of classes and where it comes from, the categories, trainable parameters and the effective batch size."""
    if args.defaults_applied:
        logger.info("Dataset defaults for %s (flags you did not set): %s", args.dataset_file,
                    arguments.command_line_of(args.defaults_applied))
    from_checkpoint = getattr(args, "checkpoint_applied", None) or {}
    if from_checkpoint:
        logger.info("From the checkpoint %s (flags you did not set): %s", args.resume,
                    arguments.command_line_of(from_checkpoint))
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("number of classes: %d (%s)", args.num_classes,
                "from the checkpoint" if "num_classes" in from_checkpoint else
                "--num_classes" if args.num_classes_given else
                # a COCO-format dataset: datasets.default_num_classes says where it came from (file, max id)
                getattr(args, "num_classes_source", None) or f"from the {args.dataset_file} dataset")
    if args.thing_ids is not None:
        logger.info("categories: %d things, %d stuff (from the dataset)", len(args.thing_ids),
                    len(args.category_names) - len(args.thing_ids))
    logger.info("trainable parameters: %d", n_parameters)
    accum = getattr(args, "accum_steps", 1)
    logger.info("effective batch size: %d (%d per process x %d processes%s)",
                args.batch_size * get_world_size() * accum, args.batch_size, get_world_size(),
                f" x {accum} accumulation steps" if accum > 1 else "")


def log_epoch_metrics(epoch: int, test_stats: dict, elapsed_s: float) -> None:
    """The console line of an evaluated epoch: box AP and AP50 (and PQ on panoptic data)."""
    if "coco_eval_bbox" in test_stats:
        ap, ap50 = test_stats["coco_eval_bbox"][:2]
        logger.info("epoch %d: bbox AP %.3f AP50 %.3f (%.1f min)", epoch, ap, ap50, elapsed_s / 60)
    if "PQ_all" in test_stats:
        logger.info("epoch %d: PQ %.1f (things %.1f, stuff %.1f)", epoch,
                    *(100 * test_stats[k]["pq"] for k in ("PQ_all", "PQ_th", "PQ_st")))


class SmoothedValue:
    """A series of values: the median and mean over a window, and the global average."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over processes (the window stays local)."""
        gathered = all_gather((self.count, self.total))
        self.count = sum(c for c, _ in gathered)
        self.total = sum(t for _, t in gathered)

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque)).median().item() if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named SmoothedValues plus ``log_every``, which yields from an iterable and prints progress lines.

    ``console``: the meters the console lines show, in this order, when present (None: every meter, as the
    original). ``str(metric_logger)`` stays the line of every meter."""

    def __init__(self, delimiter: str = "  ", console: Optional[Sequence[str]] = None):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.console = console

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v))

    def __getattr__(self, name: str) -> SmoothedValue:
        """Meters by attribute (``metric_logger.loss``), as in the original."""
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def console_str(self) -> str:
        """The meters of ``console`` (all without it): what a console line shows."""
        names = list(self.meters) if self.console is None else [n for n in self.console if n in self.meters]
        return self.delimiter.join(f"{name}: {self.meters[name]}" for name in names)

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "",
                  on_log: Optional[Callable[[int, "MetricLogger"], None]] = None):
        """Yield from ``iterable``; every ``print_freq`` items and at the last one, log a line: progress, eta,
        the ``console`` meters (latest window's median, and the global average in brackets), seconds per iteration
        and of it waiting for data; ``on_log(i, self)`` is called at the same points (e.g. to write TensorBoard
        scalars)."""
        total = len(iterable)
        width = len(str(total))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [f"{header} [{i:{width}d}/{total}]", f"eta: {eta}", self.console_str(),
                         f"time: {iter_time} s/it", f"data: {data_time} s"]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB")
                logger.info(self.delimiter.join(p for p in parts if p))
                if on_log is not None:
                    on_log(i, self)
            end = time.time()
        total_time = datetime.timedelta(seconds=int(time.time() - start))
        logger.info(f"{header} Total time: {total_time} ({(time.time() - start) / max(total, 1):.4f} s / it)")
