r"""Train and evaluate DETR with Detectron2's trainer, data registry and evaluators.

Run from the repository root, as a module, or from inside d2/ as a file, as the original's (``cd d2 && python
train_net.py --eval-only --config configs/detr_256_6_6_torchvision.yaml MODEL.WEIGHTS converted.pth``):

    # evaluate a converted published model on COCO val (Detectron2 finds COCO under $DETECTRON2_DATASETS)
    python -m d2.converter --source_model https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth \
        --output_model converted/detr_r50_d2.pth
    python -m d2.train_net --eval-only --config-file d2/configs/detr_256_6_6_torchvision.yaml \
        MODEL.WEIGHTS converted/detr_r50_d2.pth

    # train on 8 GPUs; --resume continues from OUTPUT_DIR/last_checkpoint
    python -m d2.train_net --config-file d2/configs/detr_256_6_6_torchvision.yaml --num-gpus 8 OUTPUT_DIR runs/d2
    python -m d2.train_net --config-file d2/configs/detr_256_6_6_torchvision.yaml --num-gpus 8 --resume \
        OUTPUT_DIR runs/d2

    # your own COCO-format data: register it by name on the command line (NAME JSON IMAGE_DIR)
    python -m d2.train_net --config-file d2/configs/detr_256_6_6_torchvision.yaml \
        --coco-dataset mine_train data/annotations/train.json data/train \
        --coco-dataset mine_val data/annotations/val.json data/val \
        DATASETS.TRAIN '("mine_train",)' DATASETS.TEST '("mine_val",)' MODEL.DETR.NUM_CLASSES 3

Every Detectron2 option can be changed after the flags as KEY VALUE pairs; DETR's own keys are in d2/detr/config.py.
"""
import json
import logging
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Optional

if not __package__:  # run as a file (cd d2 && python train_net.py ..., as the original's): models/, util/, d2/ are here
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.data import build_detection_test_loader, build_detection_train_loader  # noqa: E402
from detectron2.data.datasets import register_coco_instances, register_coco_panoptic  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators  # noqa: E402
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from d2.detr import DetrDatasetMapper, add_detr_config  # noqa: E402
from d2.detr.detr import load_frozen_weights  # noqa: E402
from datasets.coco import load_json  # noqa: E402
from util.checkpoint import atomic_write  # noqa: E402

logger = logging.getLogger(__name__)


def full_model_clipping(optimizer_cls: type, max_norm: float) -> type:
    """``optimizer_cls`` whose step first clips the gradient norm of all parameters together, as main.py's
    ``clip_grad_norm_(model.parameters(), clip_max_norm)`` (Detectron2's own clipping is per parameter)."""

    class FullModelClipping(optimizer_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure)

    FullModelClipping.__name__ = f"{optimizer_cls.__name__}FullModelClipping"
    return FullModelClipping


class Trainer(DefaultTrainer):
    """DefaultTrainer with DETR's data mapper, optimizer (AdamW, backbone at a lower lr, the whole model's gradient
    norm clipped) and COCO evaluators."""

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        model = super().build_model(cfg)
        if cfg.MODEL.DETR.FROZEN_WEIGHTS:
            load_frozen_weights(model, cfg.MODEL.DETR.FROZEN_WEIGHTS)
        return model

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        if self.cfg.MODEL.DETR.FROZEN_WEIGHTS and not (resume and self.checkpointer.has_checkpoint()):
            # MODEL.WEIGHTS (the configs' ImageNet ResNet) was just loaded over the frozen box model's backbone; the
            # box model under the mask head is FROZEN_WEIGHTS, all of it (a resumed run restores it from its own
            # checkpoint instead)
            load_frozen_weights(self.checkpointer.model, self.cfg.MODEL.DETR.FROZEN_WEIGHTS)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_detection_train_loader(cfg, mapper=DetrDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        if cfg.MODEL.DETR.PANOPTIC_ON:
            return COCOPanopticEvaluator(dataset_name, output_folder)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return DatasetEvaluators([COCOEvaluator(dataset_name, tasks, distributed=True, output_dir=output_folder)])

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        s = cfg.SOLVER
        # main.py: one weight decay for every parameter (norms and biases too); the backbone at a lower lr
        params = get_default_optimizer_params(
            model, base_lr=s.BASE_LR, weight_decay=s.WEIGHT_DECAY, weight_decay_norm=s.WEIGHT_DECAY,
            lr_factor_func=lambda name: s.BACKBONE_MULTIPLIER if "backbone" in name else 1.0)
        if s.OPTIMIZER == "ADAMW":
            optimizer_cls, kwargs = torch.optim.AdamW, {}
        elif s.OPTIMIZER == "SGD":
            optimizer_cls, kwargs = torch.optim.SGD, {"momentum": s.MOMENTUM, "nesterov": s.NESTEROV}
        else:
            raise ValueError(f"SOLVER.OPTIMIZER: expected 'ADAMW' or 'SGD', got {s.OPTIMIZER!r}")
        clip = s.CLIP_GRADIENTS
        if clip.ENABLED and clip.CLIP_TYPE == "full_model":
            if clip.NORM_TYPE != 2.0:
                raise ValueError("SOLVER.CLIP_GRADIENTS.NORM_TYPE: full_model clipping uses the L2 norm (2.0)")
            optimizer_cls = full_model_clipping(optimizer_cls, clip.CLIP_VALUE)
        elif clip.ENABLED:  # Detectron2's per-parameter 'value' / 'norm' clipping
            optimizer_cls = maybe_add_gradient_clipping(cfg, optimizer_cls)
        return optimizer_cls(params, lr=s.BASE_LR, weight_decay=s.WEIGHT_DECAY, **kwargs)


def register_datasets(args) -> None:
    """--coco-dataset / --coco-panoptic-dataset: register COCO-format datasets by name (in every process)."""
    for name, json_file, image_root in args.coco_dataset or []:
        register_coco_instances(name, {}, json_file, image_root)
    for name, image_root, panoptic_root, panoptic_json in args.coco_panoptic_dataset or []:
        register_coco_panoptic(name, panoptic_metadata(panoptic_json), image_root, panoptic_root, panoptic_json)


def panoptic_metadata(panoptic_json: str) -> dict:
    """Detectron2's metadata of a COCO panoptic file: contiguous ids by increasing category id, things and stuff
    in one id space (as Detectron2's builtin COCO panoptic metadata)."""
    categories = load_json(panoptic_json).get("categories")
    if not categories or not all("id" in c and "isthing" in c and "name" in c for c in categories):
        raise ValueError(f"{panoptic_json}: expected a COCO panoptic file with 'categories' holding id, name and "
                         f"isthing")
    categories = sorted(categories, key=lambda c: c["id"])
    names = [c["name"] for c in categories]
    return {
        "thing_classes": names, "stuff_classes": names,
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories) if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories) if not c["isthing"]},
    }


def setup(args) -> CfgNode:
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # this repository's loggers (d2.*, models.*, util.*) to the console and OUTPUT_DIR/log.txt, as Detectron2's
    for name in ("d2", "models", "util"):
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name, abbrev_name=name)
    return cfg


def write_results(cfg: CfgNode, results: dict) -> None:
    """OUTPUT_DIR/eval_results.json: the evaluators' numbers (Detectron2's AP in percent), written atomically."""
    path = os.path.join(cfg.OUTPUT_DIR, "eval_results.json")
    with atomic_write(path, "w") as f:
        json.dump(results, f, indent=1)
    logger.info("Evaluation results written to %s", path)


def main(args) -> OrderedDict:
    register_datasets(args)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            write_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def get_args_parser():
    parser = default_argument_parser(epilog=__doc__)
    parser.prog = "python -m d2.train_net"
    parser.add_argument("--coco-dataset", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
                        help="register a COCO-format instances dataset under NAME (repeatable)")
    parser.add_argument("--coco-panoptic-dataset", nargs=4, action="append",
                        metavar=("NAME", "IMAGE_DIR", "PANOPTIC_DIR", "PANOPTIC_JSON"),
                        help="register a COCO panoptic dataset under NAME (repeatable)")
    return parser


if __name__ == "__main__":
    cli_args = get_args_parser().parse_args(sys.argv[1:])
    if cli_args.num_gpus > 1 and not torch.cuda.is_available():
        raise SystemExit("--num-gpus: Detectron2's trainer runs one process per GPU and no GPU is visible; on CPU "
                         "use --num-gpus 1 (main.py trains with several CPU processes)")
    launch(main, cli_args.num_gpus, num_machines=cli_args.num_machines, machine_rank=cli_args.machine_rank,
           dist_url=cli_args.dist_url, args=(cli_args,))
