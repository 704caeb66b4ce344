"""TensorBoard events of a training run (rank 0, OUTPUT_DIR/tensorboard; ``--tensorboard off`` writes none).

Tags: ``train/<name>`` for every value the training loop logs (each loss, scaled and unscaled, the class error and the
lr), at the global iteration of each console line (``engine.train_one_epoch``); ``epoch/<key>`` for every number of
the epoch's log.txt line at the epoch, with its lists and dicts spread out: ``epoch/test_coco_eval_bbox/AP`` (the 12
COCO numbers by name, ``COCO_STATS_NAMES``), ``epoch/test_coco_eval_masks/AP``, ``epoch/test_PQ_all/pq`` (``sq``,
``rq``, ``n``). View them with ``tensorboard --logdir OUTPUT_DIR``.
"""
import logging
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

# the 12 numbers of COCOeval.stats, in order
COCO_STATS_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def open_writer(output_dir: Optional[Path], setting: str = "on"):
    """A ``torch.utils.tensorboard.SummaryWriter`` into ``output_dir``/tensorboard, or None: with ``setting`` 'off',
    without an output_dir, or when tensorboard is not installed (then with a one-line warning). Call on rank 0
    only."""
    if setting == "off" or not output_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch's module needs the tensorboard package
        logger.warning("TensorBoard events not written (%s); `pip install tensorboard`, or --tensorboard off", err)
        return None
    return SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))


def epoch_scalars(log_stats: dict) -> dict[str, float]:
    """The numbers of a log.txt line by TensorBoard tag (``epoch/...``, see the module's docstring)."""
    scalars = {}
    for key, value in log_stats.items():
        if isinstance(value, bool) or key == "epoch":  # (the step itself)
            continue
        if isinstance(value, (int, float)):
            scalars[f"epoch/{key}"] = float(value)
        elif isinstance(value, (list, tuple)) and key.startswith("test_coco_eval"):
            for name, v in zip(COCO_STATS_NAMES, value):
                scalars[f"epoch/{key}/{name}"] = float(v)
        elif isinstance(value, dict):
            for name, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    scalars[f"epoch/{key}/{name}"] = float(v)
    return scalars


def write_epoch(writer, log_stats: dict, epoch: int) -> None:
    for tag, value in epoch_scalars(log_stats).items():
        writer.add_scalar(tag, value, epoch)
    writer.flush()
