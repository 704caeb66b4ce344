"""Train and evaluate DETR: ``python main.py --help`` lists the flags by topic; README.md has the commands.

    python main.py --dataset_file synthetic --output_dir runs/synthetic      # the main job, on CPU
    torchrun --nproc_per_node=8 main.py --coco_path /path/to/coco --output_dir runs/detr_r50
    python main.py --batch_size 2 --no_aux_loss --eval --coco_path /path/to/coco \
        --resume https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth

--resume continues a run where it stopped (its schedule is the checkpoint's unless a flag overrides it); a
two-stage panoptic job (util/two_stage.py) run again continues the stage it was in.
"""
import argparse
import datetime
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

import datasets
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco_eval import plain_eval
from datasets.panoptic_eval import require_panopticapi
from datasets.recipes import apply_dataset_recipe
from datasets.samplers import GroupedBatchSampler, aspect_ratio_groups
from engine import evaluate, train_one_epoch
from models import build_model
from models.loader import (load_initial_weights, load_weights, read_finetune_checkpoint, take_checkpoint_flags,
                           take_finetune_flags)
from util import args as arguments
from util.amp import grad_scaler, warn_if_emulated
from util.args import check_args, get_args_parser, parse_args  # noqa: F401  (main.get_args_parser, as the original)
from util.checkpoint import (checkpoint_dict, checkpoint_paths, load_checkpoint, resume_training_state, save_args_json,
                             save_checkpoint)
from util.compile import CompiledOrEager
from util.dist import get_rank, get_world_size, is_main_process, local_main_first, process_group, wait_at_test_gate
from util.errors import user_errors_as_messages
from util.git import get_sha
from util.logger import log_epoch_metrics, log_start, log_to_file, setup_logging
from util.tensorboard import open_writer, write_epoch
from util.nested_tensor import collate_fn
from util.two_stage import train_two_stages, two_stages_apply

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """AdamW with two groups, as the original (so its optimizer states load): everything but the backbone at
    --lr, the backbone at --lr_backbone (the group is empty when the backbone is frozen); --weight_decay on both."""
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    param_dicts = [{"params": rest}, {"params": backbone, "lr": args.lr_backbone}]
    return torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay)


def build_loaders(args):
    dataset_val = build_dataset("val", args)
    dataset_train = None if args.eval else build_dataset("train", args)
    if args.distributed:
        sampler_val = DistributedSampler(dataset_val, shuffle=False)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                            collate_fn=collate_fn, num_workers=args.num_workers)
    loader_train, sampler_train = None, None
    if dataset_train is not None:
        sampler_train = (DistributedSampler(dataset_train) if args.distributed
                         else torch.utils.data.RandomSampler(dataset_train))
        # the original drops the last incomplete batch; a split smaller than one batch keeps it instead
        drop_last = len(dataset_train) >= args.batch_size * get_world_size()
        if not drop_last:
            logger.warning("the training split (%d images) is smaller than one batch (%d): keeping the partial batch",
                           len(dataset_train), args.batch_size * get_world_size())
        if args.aspect_ratio_grouping:  # less padding: images of similar aspect ratio in batches of their own
            batch_sampler = GroupedBatchSampler(sampler_train, aspect_ratio_groups(dataset_train), args.batch_size,
                                                drop_last=drop_last)
        else:
            batch_sampler = torch.utils.data.BatchSampler(sampler_train, args.batch_size, drop_last=drop_last)
        loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler, collate_fn=collate_fn,
                                  num_workers=args.num_workers)
    return loader_train, sampler_train, loader_val, dataset_val


def write_epoch_outputs(output_dir: Path, log_stats: dict, coco_evaluator, epoch: int) -> None:
    with (output_dir / "log.txt").open("a") as f:
        f.write(json.dumps(log_stats) + "\n")
    if coco_evaluator is not None and "bbox" in coco_evaluator.coco_eval:
        names = ["latest.pth"] + ([f"{epoch:03}.pth"] if epoch % 50 == 0 else [])
        for name in names:
            save_checkpoint(plain_eval(coco_evaluator.coco_eval["bbox"]), str(output_dir / "eval" / name))


def main(args: argparse.Namespace) -> dict:
    """Train (or with --eval, evaluate) and return the last evaluation stats.

    ``args`` is a Namespace of ``get_args_parser()``. Which flags were given decides what a dataset recipe and a
    resumed checkpoint may set (``util.args.given_flags``: ``args.explicit_flags`` when ``util.args.parse_args``
    recorded it, else the flags whose value differs from the parser's default); it is fixed here, before anything
    fills the other flags.
    """
    setup_logging()
    args.explicit_flags = sorted(arguments.given_flags(args))
    apply_dataset_recipe(args)
    check_args(args)
    if two_stages_apply(args):  # each stage is a run of main() (util/two_stage.py), in one process group
        with process_group(args):
            return train_two_stages(args, main, apply_dataset_recipe)
    if args.two_stage:  # the dataset's default does not apply to one stage's run (--masks, --eval, ...)
        args.two_stage = False
        args.defaults_applied.pop("two_stage", None)
    with log_to_file(Path(args.output_dir) / "console.log" if args.output_dir else None), process_group(args):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    """main() within the process group: build, load, then evaluate or train."""
    # --resume: the checkpoint's architecture and evaluation size for the flags not given, before anything is built
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        take_checkpoint_flags(args, checkpoint)
    # --finetune (a path, URL or hub name): likewise its architecture, but not its classes (this dataset's); the
    # published checkpoints' categories are COCO's, which their args do not record
    finetune = read_finetune_checkpoint(args.finetune, datasets.KNOWN_CATEGORY_NAMES) if args.finetune else None
    if finetune is not None:
        take_finetune_flags(args, finetune)
    logger.info("git: %s", get_sha())
    # the console: the flags given (a recipe's and a checkpoint's are logged by log_start); the log file: all of them
    logger.info("args given: %s", arguments.command_line(args, args.explicit_flags) or "(none)")
    logger.info("args: %s", json.dumps(vars(args), default=str), extra={"file_only": True})

    device = torch.device(args.device)
    seed_everything(args.seed + get_rank())  # a different seed per process, as the original
    if args.amp != "off":
        warn_if_emulated(device.type, args.amp)
    scaler = grad_scaler(device, args.amp)

    with local_main_first():  # e.g. the synthetic data: generated once per node while the other processes wait
        datasets.prepare(args)
    args.num_classes_given = args.num_classes is not None
    if args.num_classes is None:
        args.num_classes = datasets.default_num_classes(args)
    loader_train, sampler_train, loader_val, dataset_val = build_loaders(args)
    datasets.set_dataset_metadata(args, dataset_val)
    model, criterion, postprocessors = build_model(args)
    if "panoptic" in postprocessors:
        require_panopticapi()  # now, rather than after the first training epoch
    model.to(device)
    optimizer = build_optimizer(model, args)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)

    load_initial_weights(args, model, finetune)  # --frozen_weights, --finetune or the backbone's own weights
    finetune = None  # nor need its weights
    if checkpoint is not None:  # --resume
        load_weights(model, checkpoint, args.resume, args=args, flag="--resume")
        resume_training_state(args, checkpoint, optimizer, lr_scheduler, scaler)
        checkpoint = None  # the optimizer state read from the file need not stay in memory during training
    model_without_ddp = model
    if args.distributed:
        device_ids = [args.gpu] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if args.compile:
        model = CompiledOrEager(model)
    log_start(args, model_without_ddp)
    if args.output_dir and is_main_process():
        save_args_json(Path(args.output_dir) / "args.json", args)

    # for a panoptic dataset: the detection annotations of the same images, for box (and mask) AP, as the original
    base_ds = get_coco_api_from_dataset(dataset_val)
    output_dir = Path(args.output_dir) if args.output_dir else None
    if args.eval:
        test_stats, coco_evaluator = evaluate(model, criterion, postprocessors, loader_val, base_ds, device,
                                              args.output_dir, coco_eval_backend=args.coco_eval_backend, amp=args.amp)
        if output_dir and is_main_process() and "bbox" in coco_evaluator.coco_eval:
            save_checkpoint(plain_eval(coco_evaluator.coco_eval["bbox"]), str(output_dir / "eval.pth"))
        return test_stats
    tensorboard = open_writer(output_dir, getattr(args, "tensorboard", "on")) if is_main_process() else None
    try:
        return train(args, model, model_without_ddp, criterion, postprocessors, optimizer, lr_scheduler, scaler,
                     loader_train, sampler_train, loader_val, base_ds, device, output_dir, tensorboard)
    finally:
        if tensorboard is not None:
            tensorboard.close()


def evaluates_at(epoch: int, args) -> bool:
    """--eval_every N: after every N-th epoch (epochs N-1, 2N-1, ...) and after the last one."""
    return (epoch + 1) % getattr(args, "eval_every", 1) == 0 or epoch == args.epochs - 1


def train(args, model, model_without_ddp, criterion, postprocessors, optimizer, lr_scheduler, scaler, loader_train,
          sampler_train, loader_val, base_ds, device, output_dir: Optional[Path], tensorboard=None) -> dict:
    """The epoch loop: train, step the lr, checkpoint, evaluate (--eval_every), log (log.txt, and ``tensorboard``,
    a SummaryWriter, when given). Returns the last evaluation's stats."""
    logger.info("Start training")
    start_time = time.time()
    test_stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, args.clip_max_norm,
                                      warmup_iters=args.warmup_iters, amp=args.amp, scaler=scaler,
                                      accum_steps=args.accum_steps, tensorboard=tensorboard)
        lr_scheduler.step()
        if output_dir and is_main_process():
            state = checkpoint_dict(model_without_ddp, optimizer, lr_scheduler, epoch, args, scaler)
            for path in checkpoint_paths(output_dir, epoch, args.lr_drop):
                save_checkpoint(state, str(path))

        epoch_test_stats, coco_evaluator = {}, None
        if evaluates_at(epoch, args):
            epoch_test_stats, coco_evaluator = evaluate(model, criterion, postprocessors, loader_val, base_ds, device,
                                                        args.output_dir, coco_eval_backend=args.coco_eval_backend,
                                                        amp=args.amp)
            test_stats = epoch_test_stats
        # an epoch without evaluation has no test_* keys (util.plot_utils and util.two_stage skip it)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in epoch_test_stats.items()},
                     "epoch": epoch,
                     "n_parameters": sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad),
                     "elapsed_s": round(time.time() - start_time, 1)}
        if output_dir and is_main_process():
            write_epoch_outputs(output_dir, log_stats, coco_evaluator, epoch)
        if tensorboard is not None:
            write_epoch(tensorboard, log_stats, epoch)
        log_epoch_metrics(epoch, epoch_test_stats, time.time() - start_time)
        if output_dir:
            wait_at_test_gate(output_dir)

    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    logger.info("Training time %s", total_time)
    return test_stats


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    with user_errors_as_messages():  # a bad path or checkpoint: "error: <message>", exit status 1
        main(args)
