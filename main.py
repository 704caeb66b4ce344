"""Train and evaluate DETR.

Copy-pasteable commands (run from the repository root):

    # the main job on the embedded synthetic data, CPU-sized (generates the data once)
    python main.py --dataset_file synthetic --output_dir runs/synthetic

    # COCO, 8 GPUs, as the original
    torchrun --nproc_per_node=8 main.py --coco_path /path/to/coco --output_dir runs/detr_r50

    # evaluate a published checkpoint on COCO val
    python main.py --batch_size 2 --no_aux_loss --eval --resume https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth \
        --coco_path /path/to/coco
"""
import argparse
import copy
import datetime
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

import datasets
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.synthetic import SYNTHETIC_DEFAULTS
from engine import evaluate, train_one_epoch
from models import build_model
from models.backbone import load_backbone_weights
from util.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from util.dist import get_rank, get_world_size, init_distributed_mode, is_main_process
from util.logger import setup_logging
from util.nested_tensor import collate_fn

logger = logging.getLogger("detr")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Set transformer detector", add_help=False)
    parser.add_argument("--lr", default=1e-4, type=float, help="learning rate of the transformer and heads")
    parser.add_argument("--lr_backbone", default=1e-5, type=float,
                        help="learning rate of the backbone; 0 freezes it (and then no intermediate layer trains)")
    parser.add_argument("--batch_size", default=2, type=int, help="images per process and step")
    parser.add_argument("--weight_decay", default=1e-4, type=float, help="AdamW weight decay")
    parser.add_argument("--epochs", default=300, type=int, help="number of training epochs")
    parser.add_argument("--lr_drop", default=200, type=int, help="epoch at which the lr is divided by 10 (StepLR)")
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm (0: none)")
    parser.add_argument("--warmup_iters", default=0, type=int,
                        help="linear lr warmup over this many iterations (0: none, as the original)")

    # Model parameters
    parser.add_argument("--frozen_weights", type=str, default=None,
                        help="path to a pretrained box model; if set, only the mask head is trained")
    # * Backbone
    parser.add_argument("--backbone", default="resnet50", type=str, help="torchvision ResNet to use")
    parser.add_argument("--dilation", action="store_true",
                        help="replace the stride of the last block by a dilation (DC5)")
    parser.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned", "v2", "v3"),
                        help="type of positional embedding on top of the image features")
    parser.add_argument("--backbone_weights", default="imagenet", type=str,
                        help="initial backbone weights: 'imagenet' (torchvision's ImageNet-1k V1, from the torch "
                             "hub cache or downloaded), 'none' (random) or a path to a ResNet state dict; not used "
                             "when a full checkpoint is loaded (--resume, --frozen_weights)")
    parser.add_argument("--backbone_norm", default="frozen_bn", choices=("frozen_bn", "bn"),
                        help="backbone normalisation: frozen batch norm (original) or trainable BatchNorm "
                             "(convergence aid when training from random weights)")
    parser.add_argument("--backbone_last_layer", default="layer4", choices=("layer3", "layer4"),
                        help="last ResNet stage used: layer4 (stride 32, original) or layer3 (stride 16)")
    parser.add_argument("--train_backbone_stem", action="store_true",
                        help="also train the stem and layer1 (frozen in the original)")
    # * Transformer
    parser.add_argument("--enc_layers", default=6, type=int, help="number of encoding layers in the transformer")
    parser.add_argument("--dec_layers", default=6, type=int, help="number of decoding layers in the transformer")
    parser.add_argument("--dim_feedforward", default=2048, type=int,
                        help="intermediate size of the feedforward layers in the transformer blocks")
    parser.add_argument("--hidden_dim", default=256, type=int,
                        help="size of the embeddings (dimension of the transformer)")
    parser.add_argument("--dropout", default=0.1, type=float, help="dropout applied in the transformer")
    parser.add_argument("--nheads", default=8, type=int, help="number of attention heads in the transformer")
    parser.add_argument("--num_queries", default=100, type=int, help="number of query slots")
    parser.add_argument("--pre_norm", action="store_true", help="pre-norm transformer layers")
    parser.add_argument("--pos_at_input", action="store_true",
                        help="also add the positional encoding to the encoder input (convergence aid)")
    parser.add_argument("--spatial_prior", action="store_true",
                        help="per-query reference points with a Gaussian cross-attention prior, SMCA-style "
                             "(convergence aid for training from scratch; not the published DETR)")
    # * Segmentation
    parser.add_argument("--masks", action="store_true", help="train the segmentation head")

    # Loss
    parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                        help="disable the auxiliary decoding losses (loss at each layer)")
    # * Matcher
    parser.add_argument("--set_cost_class", default=1, type=float, help="class coefficient in the matching cost")
    parser.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box coefficient in the matching cost")
    parser.add_argument("--set_cost_giou", default=2, type=float, help="giou box coefficient in the matching cost")
    # * Loss coefficients
    parser.add_argument("--mask_loss_coef", default=1, type=float, help="weight of the focal mask loss")
    parser.add_argument("--dice_loss_coef", default=1, type=float, help="weight of the dice mask loss")
    parser.add_argument("--bbox_loss_coef", default=5, type=float, help="weight of the L1 box loss")
    parser.add_argument("--giou_loss_coef", default=2, type=float, help="weight of the GIoU box loss")
    parser.add_argument("--eos_coef", default=0.1, type=float,
                        help="relative classification weight of the no-object class")

    # dataset parameters
    parser.add_argument("--dataset_file", default="coco", help="coco, coco_panoptic or synthetic")
    parser.add_argument("--coco_path", type=str, help="COCO-format folder (train2017/, val2017/, annotations/)")
    parser.add_argument("--coco_panoptic_path", type=str, help="COCO panoptic folder")
    parser.add_argument("--remove_difficult", action="store_true", help="(unused; kept for compatibility)")
    parser.add_argument("--num_classes", default=None, type=int,
                        help="number of object classes (max class id + 1); default from the dataset: 91 for coco, "
                             "250 for coco_panoptic, the categories of the annotation file otherwise")
    parser.add_argument("--scales", default=[480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800], type=int,
                        nargs="+", help="training shorter-side sizes, one picked at random per image")
    parser.add_argument("--max_size", default=1333, type=int, help="longest side after resizing")
    parser.add_argument("--val_size", default=800, type=int, help="evaluation shorter-side size")
    parser.add_argument("--crop_scales", default=[400, 500, 600], type=int, nargs="*",
                        help="sizes of the resize before the random crop augmentation (empty: no crop branch)")
    parser.add_argument("--crop_size", default=[384, 600], type=int, nargs=2,
                        help="min and max side of the random crop")

    parser.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to use for training / testing")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="", help="resume from checkpoint (path or URL): model, optimizer, "
                                                     "lr scheduler and epoch")
    parser.add_argument("--finetune", default="",
                        help="start from a checkpoint's model weights only (path or URL); a class head of another "
                             "size is re-initialised with a warning; optimizer and epoch start fresh")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--eval", action="store_true", help="only evaluate")
    parser.add_argument("--num_workers", default=2, type=int, help="data loading workers")
    parser.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"),
                        help="mixed precision: off (fp32, as the original), bf16 or fp16")

    # distributed training parameters
    parser.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    return parser


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags actually given on the command line."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; ``--dataset_file synthetic`` fills every flag the user did not give with the
    dataset's CPU-sized defaults (printed at start)."""
    parser = argparse.ArgumentParser("DETR training and evaluation script", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    args.defaults_applied = {}
    if args.dataset_file == "synthetic":
        given = explicit_flags(parser, argv)
        for name, value in SYNTHETIC_DEFAULTS.items():
            if name not in given:
                setattr(args, name, value)
                args.defaults_applied[name] = value
    return args


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """AdamW with two groups: the backbone at --lr_backbone, everything else at --lr."""
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    param_dicts = [{"params": rest}]
    if backbone:
        param_dicts.append({"params": backbone, "lr": args.lr_backbone})
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
        batch_sampler = torch.utils.data.BatchSampler(sampler_train, args.batch_size, drop_last=drop_last)
        loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler, collate_fn=collate_fn,
                                  num_workers=args.num_workers)
    return loader_train, sampler_train, loader_val, dataset_val


def resume(args, model_without_ddp, optimizer, lr_scheduler) -> None:
    """--resume: model, and unless --eval, optimizer, lr scheduler and epoch; says what was restored."""
    checkpoint = load_checkpoint(args.resume)
    load_model_state(model_without_ddp, checkpoint["model"], source=args.resume)
    restored = ["model"]
    if not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        args.start_epoch = checkpoint["epoch"] + 1
        restored += ["optimizer", "lr_scheduler", f"epoch (continuing at epoch {args.start_epoch})"]
    not_restored = [k for k in ("optimizer", "lr_scheduler", "epoch") if not any(r.startswith(k) for r in restored)]
    logger.info("Resumed from %s: restored %s%s", args.resume, ", ".join(restored),
                f"; not restored: {', '.join(not_restored)}" if not_restored else "")


def load_initial_weights(args, model_without_ddp) -> None:
    """--frozen_weights (box model under a mask head), --finetune (weights only) or the backbone's own weights."""
    if args.frozen_weights:
        checkpoint = load_checkpoint(args.frozen_weights)
        load_model_state(model_without_ddp.detr, checkpoint["model"], source=args.frozen_weights)
        logger.info("Loaded the frozen box model from %s", args.frozen_weights)
    elif args.finetune:
        checkpoint = load_checkpoint(args.finetune)
        skipped = load_model_state(model_without_ddp, checkpoint["model"], source=args.finetune,
                                   reinit_class_head=True)
        logger.info("Fine-tuning from the weights of %s%s", args.finetune,
                    f" (class head re-initialised: {skipped})" if skipped else "")
    elif not args.resume:
        source = load_backbone_weights(model_without_ddp.backbone[0] if not args.masks
                                       else model_without_ddp.detr.backbone[0], args.backbone_weights)
        logger.info("Backbone weights: %s", source or "random initialisation (--backbone_weights none)")


def checkpoint_dict(model_without_ddp, optimizer, lr_scheduler, epoch: int, args) -> dict:
    args_dict = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    return {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args_dict}


def plain_eval(coco_eval) -> dict:
    """COCOeval.eval (precision [T, R, K, A, M], recall, scores) as plain types, readable with weights_only."""
    ev = coco_eval.eval
    out = {k: torch.as_tensor(ev[k]) for k in ("precision", "recall", "scores")}
    out["counts"] = [int(c) for c in ev["counts"]]
    out["date"] = str(ev["date"])
    p = coco_eval.params
    out["params"] = {"iouThrs": p.iouThrs.tolist(), "recThrs": p.recThrs.tolist(),
                     "catIds": [int(c) for c in p.catIds], "areaRngLbl": [str(a) for a in p.areaRngLbl],
                     "maxDets": [int(m) for m in p.maxDets]}
    out["stats"] = coco_eval.stats.tolist()
    return out


def _as_flag(name: str, value) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else ""
    if isinstance(value, list):
        return f"--{name} {' '.join(map(str, value))}".rstrip()
    return f"--{name} {value}"


def print_start(args, model_without_ddp) -> None:
    if args.defaults_applied:
        logger.info("Dataset defaults for %s (flags you did not set): %s", args.dataset_file,
                    " ".join(_as_flag(k, v) for k, v in args.defaults_applied.items()))
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    logger.info("number of classes: %d (%s)", args.num_classes,
                "--num_classes" if args.num_classes_given else f"from the {args.dataset_file} dataset")
    logger.info("trainable parameters: %d", n_parameters)
    logger.info("effective batch size: %d (%d per process x %d processes)", args.batch_size * get_world_size(),
                args.batch_size, get_world_size())


def main(args: argparse.Namespace) -> dict:
    """Train (or with --eval, evaluate) and return the last evaluation stats."""
    setup_logging()
    if not hasattr(args, "defaults_applied"):
        args.defaults_applied = {}
    if args.amp != "off":
        raise SystemExit(f"--amp {args.amp}: mixed precision is not available yet; use --amp off (fp32)")
    if args.frozen_weights is not None and not args.masks:
        raise SystemExit("--frozen_weights is only for training the segmentation head: add --masks")
    init_distributed_mode(args)
    logger.info("args: %s", json.dumps(vars(args), default=str))

    device = torch.device(args.device)
    seed_everything(args.seed + get_rank())  # a different seed per process, as the original

    args.num_classes_given = args.num_classes is not None
    if args.num_classes is None:
        args.num_classes = datasets.default_num_classes(args)
    model, criterion, postprocessors = build_model(args)
    model.to(device)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module
    print_start(args, model_without_ddp)

    optimizer = build_optimizer(model_without_ddp, args)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    loader_train, sampler_train, loader_val, dataset_val = build_loaders(args)
    base_ds = get_coco_api_from_dataset(dataset_val)

    load_initial_weights(args, model_without_ddp)
    if args.resume:
        resume(args, model_without_ddp, optimizer, lr_scheduler)

    output_dir = Path(args.output_dir) if args.output_dir else None
    if args.eval:
        test_stats, coco_evaluator = evaluate(model, criterion, postprocessors, loader_val, base_ds, device,
                                              args.output_dir)
        if output_dir and is_main_process() and "bbox" in coco_evaluator.coco_eval:
            save_checkpoint(plain_eval(coco_evaluator.coco_eval["bbox"]), str(output_dir / "eval.pth"))
        return test_stats

    logger.info("Start training")
    start_time = time.time()
    test_stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, args.clip_max_norm,
                                      warmup_iters=args.warmup_iters)
        lr_scheduler.step()
        if output_dir and is_main_process():
            paths = [output_dir / "checkpoint.pth"]
            # extra checkpoint before the lr drop and every 100 epochs
            if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % 100 == 0:
                paths.append(output_dir / f"checkpoint{epoch:04}.pth")
            state = checkpoint_dict(model_without_ddp, optimizer, lr_scheduler, epoch, args)
            for path in paths:
                save_checkpoint(state, str(path))

        test_stats, coco_evaluator = evaluate(model, criterion, postprocessors, loader_val, base_ds, device,
                                              args.output_dir)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items()},
                     "epoch": epoch,
                     "n_parameters": sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad),
                     "elapsed_s": round(time.time() - start_time, 1)}
        if output_dir and is_main_process():
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
            if coco_evaluator is not None and "bbox" in coco_evaluator.coco_eval:
                (output_dir / "eval").mkdir(exist_ok=True)
                names = ["latest.pth"] + ([f"{epoch:03}.pth"] if epoch % 50 == 0 else [])
                for name in names:
                    save_checkpoint(plain_eval(coco_evaluator.coco_eval["bbox"]), str(output_dir / "eval" / name))
        if "coco_eval_bbox" in test_stats:
            ap, ap50 = test_stats["coco_eval_bbox"][:2]
            logger.info("epoch %d: bbox AP %.3f AP50 %.3f (%.1f min)", epoch, ap, ap50,
                        (time.time() - start_time) / 60)

    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    logger.info("Training time %s", total_time)
    return test_stats


if __name__ == "__main__":
    cli_args = parse_args(sys.argv[1:])
    if cli_args.output_dir:
        Path(cli_args.output_dir).mkdir(parents=True, exist_ok=True)
    main(cli_args)
