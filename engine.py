"""The two loops: one training epoch, and evaluation (losses + COCO metrics + panoptic quality)."""
import contextlib
import itertools
import json
import logging
import math
import os
from typing import Callable, Iterable, Optional

import torch

from datasets import get_panoptic_files
from datasets.coco_eval import CocoEvaluator
from datasets.panoptic_eval import PanopticEvaluator, pq_log_stats
from util.amp import autocast, to_float
from util.dist import reduce_dict
from util.logger import MetricLogger, SmoothedValue

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


# What the console lines show: the total loss, the weighted main-layer terms (the masks' with --masks), the class
# error and the lr. Every other value (each auxiliary layer's loss, the unscaled terms) goes to log.txt, the log file
# and TensorBoard only.
CONSOLE_METERS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice", "class_error", "lr")


def _log_averages(metric_logger: MetricLogger) -> None:
    """The epoch's averages: the console's meters on the console, every meter in the log file."""
    logger.info("Averaged stats: %s", metric_logger.console_str())
    logger.info("Averaged stats (all): %s", metric_logger, extra={"file_only": True})


def _tensorboard_steps(writer, first_step: int) -> Callable[[int, MetricLogger], None]:
    """``MetricLogger.log_every``'s on_log: each meter's latest value as the scalar train/<name> at the global
    iteration ``first_step + i``."""
    def on_log(i: int, metric_logger: MetricLogger) -> None:
        for name, meter in metric_logger.meters.items():
            writer.add_scalar(f"train/{name}", meter.value, first_step + i)
    return on_log


def _weighted_losses(loss_dict: dict, weight_dict: dict) -> torch.Tensor:
    return sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)


def _log_dicts(loss_dict_reduced: dict, weight_dict: dict) -> tuple[dict, dict]:
    unscaled = {f"{k}_unscaled": v for k, v in loss_dict_reduced.items()}
    scaled = {k: v * weight_dict[k] for k, v in loss_dict_reduced.items() if k in weight_dict}
    return unscaled, scaled


class _Steps:
    """The micro-batches of ``data_loader`` in groups of ``accum_steps``, one group per optimizer step.

    An epoch has len(data_loader) // accum_steps steps: the micro-batches left over at its end are dropped, as the
    training loader drops an incomplete batch (every step sees the same batch, the one the lr was set for). A
    loader with fewer micro-batches than that makes one step of them all."""

    def __init__(self, data_loader: Iterable, accum_steps: int):
        self.data_loader = data_loader
        self.accum_steps = accum_steps
        n = len(data_loader)
        self.steps = n // accum_steps or min(n, 1)
        self.dropped = n - min(n, self.steps * accum_steps)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        micro_batches = iter(self.data_loader)
        for _ in range(self.steps):
            yield list(itertools.islice(micro_batches, self.accum_steps))


def _no_sync(model: torch.nn.Module, sync: bool):
    """DDP's no_sync (gradients accumulate locally, no all-reduce) unless ``sync``; nothing without DDP. The
    model may be DDP itself or wrapped once (util.compile.CompiledOrEager keeps it as ``.module``)."""
    for m in (model, getattr(model, "module", None)):
        if isinstance(m, torch.nn.parallel.DistributedDataParallel) and not sync:
            return m.no_sync()
    return contextlib.nullcontext()


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, max_norm: float = 0,
                    warmup_iters: int = 0, max_consecutive_nonfinite: int = 5, print_freq: int = 10,
                    amp: str = "off", scaler: Optional[torch.amp.GradScaler] = None, accum_steps: int = 1,
                    tensorboard=None) -> dict:
    """Train for one epoch; returns the epoch's global averages of every logged value.

    ``accum_steps`` K > 1 accumulates the gradients of K micro-batches (batches of ``data_loader``) into one
    optimizer step, equal to one step on a K times larger batch: the criterion normalises each micro-batch's losses
    as the whole batch's (``SetCriterion.forward``'s ``batch_targets``), DDP all-reduces the gradients on the last
    micro-batch only, and warmup, clipping, the fp16 scaler, the non-finite skip and the logged values act per
    optimizer step (the logged losses are the whole batch's). An epoch has len(data_loader) // K steps; the
    micro-batches left over are dropped (``_Steps``). K = 1 is the original's loop.
    ``warmup_iters`` > 0 scales the lr of every group (what the lr scheduler set, e.g. after a drop) linearly from
    0 to 1 over the first optimizer steps of training (counted from epoch 0); the groups hold the scheduler's values
    again when the epoch ends. A step whose loss is not finite is skipped and reported
    (loss values and image ids); after ``max_consecutive_nonfinite`` such steps in a row training stops.
    ``amp`` 'bf16' / 'fp16' runs the model's forward under autocast (losses and matching stay fp32); ``scaler``
    (fp16) scales the loss and skips steps whose gradients overflow. ``tensorboard`` (a SummaryWriter, or None)
    receives every logged value at each console line (``print_freq``), at the global iteration.
    """
    if accum_steps < 1:
        raise ValueError(f"train_one_epoch: accum_steps must be at least 1, got {accum_steps}")
    model.train()
    criterion.train()
    metric_logger = MetricLogger(delimiter="  ", console=CONSOLE_METERS)
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metric_logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    header = f"Epoch: [{epoch}]"
    consecutive_nonfinite = 0
    skipped = 0
    steps = _Steps(data_loader, accum_steps)
    if steps.dropped:
        logger.info("--accum_steps %d: %d optimizer steps of %d micro-batches; the last %d micro-batches of the "
                    "epoch are left out", accum_steps, len(steps), accum_steps, steps.dropped)
    weight_dict = criterion.weight_dict

    # the learning rates the lr scheduler set for this epoch; a warmup scales them, whatever they are
    scheduled_lrs = [group["lr"] for group in optimizer.param_groups]
    on_log = _tensorboard_steps(tensorboard, epoch * len(steps)) if tensorboard is not None else None
    for i, micro_batches in enumerate(metric_logger.log_every(steps, print_freq, header, on_log)):
        global_iter = epoch * len(steps) + i  # counts optimizer steps
        if global_iter < warmup_iters:
            for group, lr in zip(optimizer.param_groups, scheduled_lrs):
                group["lr"] = lr * (global_iter + 1) / warmup_iters
        elif warmup_iters:
            for group, lr in zip(optimizer.param_groups, scheduled_lrs):
                group["lr"] = lr

        micro_batches = [(samples, [{k: v.to(device) for k, v in t.items()} for t in targets])
                         for samples, targets in micro_batches]
        # gradient accumulation: every micro-batch's losses are its share of the whole batch's
        batch_targets = [t for _, targets in micro_batches for t in targets] if len(micro_batches) > 1 else None
        optimizer.zero_grad()
        step_reduced = []  # each micro-batch's losses, averaged across processes
        loss_value = 0.0
        for j, (samples, targets) in enumerate(micro_batches):
            with _no_sync(model, sync=j == len(micro_batches) - 1):
                with autocast(device, amp):
                    outputs = model(samples.to(device))  # one micro-batch's images on the device at a time
                if batch_targets is None:
                    loss_dict = criterion(to_float(outputs), targets)
                else:
                    loss_dict = criterion(to_float(outputs), targets, batch_targets=batch_targets)
                losses = _weighted_losses(loss_dict, weight_dict)

                loss_dict_reduced = reduce_dict(loss_dict)
                micro_loss = _weighted_losses(loss_dict_reduced, weight_dict).item()
                loss_value += micro_loss
                if not math.isfinite(micro_loss):
                    # the same on every process (the losses are reduced): all leave the step before DDP's
                    # all-reduce; the other micro-batches of the step are not run
                    image_ids = [int(t["image_id"]) for t in targets if "image_id" in t]
                    break
                step_reduced.append(loss_dict_reduced)
                if scaler is None:
                    losses.backward()
                else:
                    scaler.scale(losses).backward()

        if not math.isfinite(loss_value):
            consecutive_nonfinite += 1
            skipped += 1
            where = f"iteration {i}" + (f" (micro-batch {j})" if len(micro_batches) > 1 else "")
            logger.warning("Loss is %s at epoch %d %s, step skipped. Image ids: %s. Losses: %s",
                           loss_value, epoch, where, image_ids,
                           json.dumps({k: float(v.detach()) for k, v in loss_dict_reduced.items()}))
            optimizer.zero_grad()
            if consecutive_nonfinite >= max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{consecutive_nonfinite} consecutive non-finite losses (last at epoch {epoch}, {where}, "
                    f"images {image_ids}); the training diverged: lower --lr, check --clip_max_norm and the data")
            continue
        consecutive_nonfinite = 0

        if scaler is None:
            if max_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
        else:
            if max_norm > 0:
                scaler.unscale_(optimizer)  # clip the true gradients
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            scaler.step(optimizer)
            scaler.update()

        loss_dict_reduced = _step_losses(step_reduced, weight_dict)
        unscaled, scaled = _log_dicts(loss_dict_reduced, weight_dict)
        metric_logger.update(loss=loss_value, **scaled, **unscaled)
        metric_logger.update(class_error=loss_dict_reduced["class_error"])
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])

    # hand the scheduler back its own learning rates (StepLR computes the next ones from the current ones)
    for group, lr in zip(optimizer.param_groups, scheduled_lrs):
        group["lr"] = lr
    metric_logger.synchronize_between_processes()
    _log_averages(metric_logger)
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats["skipped_steps"] = skipped
    return stats


def _step_losses(per_micro_batch: list[dict], weight_dict: dict) -> dict:
    """One optimizer step's values from its micro-batches': the losses (weight_dict's keys, each micro-batch's
    share of the batch's) summed, the logged-only values (class_error, cardinality_error) averaged."""
    if len(per_micro_batch) == 1:
        return per_micro_batch[0]
    n = len(per_micro_batch)
    return {k: sum(d[k] for d in per_micro_batch) / (1 if k in weight_dict else n) for k in per_micro_batch[0]}


@torch.no_grad()
def evaluate(model: torch.nn.Module, criterion: torch.nn.Module, postprocessors: dict, data_loader: Iterable,
             base_ds, device: torch.device, output_dir: str, print_freq: int = 10, coco_eval_backend: str = "auto",
             amp: str = "off") -> tuple[dict, Optional[CocoEvaluator]]:
    """Losses on the split plus COCO metrics for every post-processor ('bbox', 'segm') and, with a 'panoptic'
    post-processor, panoptic quality against the panoptic ground truth of ``data_loader.dataset``.

    Returns (stats, coco_evaluator); stats['coco_eval_bbox'] holds the 12 pycocotools numbers (computed by
    `coco_eval_backend`: 'auto', 'pycocotools' or 'hotcoco', see datasets.coco_eval), stats['coco_eval_masks']
    those of the masks, and stats['PQ_all'], ['PQ_th'], ['PQ_st'] panopticapi's {'pq', 'sq', 'rq', 'n'} of all,
    thing and stuff categories (fractions in [0, 1]), as the original logs them. The predicted panoptic PNGs and
    their JSON go to `output_dir`/panoptic_eval (./panoptic_eval without an output_dir, as in the original).
    ``amp`` runs the forward under autocast; losses and post-processing stay fp32.
    """
    model.eval()
    criterion.eval()
    metric_logger = MetricLogger(delimiter="  ", console=CONSOLE_METERS)
    metric_logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    header = "Test:"

    iou_types = tuple(k for k in ("segm", "bbox") if k in postprocessors)
    coco_evaluator = CocoEvaluator(base_ds, iou_types, backend=coco_eval_backend)
    panoptic_evaluator = None
    if "panoptic" in postprocessors:
        ann_file, ann_folder = get_panoptic_files(getattr(data_loader, "dataset", data_loader))
        panoptic_evaluator = PanopticEvaluator(ann_file, ann_folder,
                                               output_dir=os.path.join(output_dir or "", "panoptic_eval"))

    for samples, targets in metric_logger.log_every(data_loader, print_freq, header):
        samples = samples.to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with autocast(device, amp):
            outputs = model(samples)
        outputs = to_float(outputs)
        loss_dict = criterion(outputs, targets)
        loss_dict_reduced = reduce_dict(loss_dict)
        unscaled, scaled = _log_dicts(loss_dict_reduced, criterion.weight_dict)
        metric_logger.update(loss=sum(scaled.values()), **scaled, **unscaled)
        metric_logger.update(class_error=loss_dict_reduced["class_error"])

        orig_target_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
        target_sizes = torch.stack([t["size"] for t in targets], dim=0)
        results = postprocessors["bbox"](outputs, orig_target_sizes)
        if "segm" in postprocessors:
            results = postprocessors["segm"](results, outputs, orig_target_sizes, target_sizes)
        coco_evaluator.update({int(t["image_id"]): r for t, r in zip(targets, results)})
        if panoptic_evaluator is not None:
            res_pano = postprocessors["panoptic"](outputs, target_sizes, orig_target_sizes)
            for t, r in zip(targets, res_pano):
                image_id = int(t["image_id"])
                r["image_id"] = image_id
                r["file_name"] = f"{image_id:012d}.png"
            panoptic_evaluator.update(res_pano)

    metric_logger.synchronize_between_processes()
    _log_averages(metric_logger)
    coco_evaluator.synchronize_between_processes()
    coco_evaluator.accumulate()
    coco_evaluator.summarize()
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    # the original's log keys: coco_eval_bbox, coco_eval_masks
    for iou_type, key in (("bbox", "coco_eval_bbox"), ("segm", "coco_eval_masks")):
        if iou_type in iou_types:
            stats[key] = coco_evaluator.coco_eval[iou_type].stats.tolist()
    if panoptic_evaluator is not None:
        # computed on rank 0 from every process's PNGs; every process gets the result
        stats.update(pq_log_stats(panoptic_evaluator.summarize()))
    return stats, coco_evaluator
