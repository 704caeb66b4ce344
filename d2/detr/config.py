"""DETR's hyper-parameters as Detectron2 config keys.

``add_detr_config`` adds the keys Detectron2 does not have, with ``main.py``'s defaults. The hyper-parameters that
Detectron2 already has a key for (learning rate, input sizes, ...) are set by the shipped configs in
``d2/configs/``; ``MAIN_PY_FLAGS`` below says which key stands for which ``main.py`` flag, and the tests check that
the shipped configs give every one of them ``main.py``'s default.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_detr_config", "MAIN_PY_FLAGS", "NOT_IN_CONFIG"]


def add_detr_config(cfg: CN) -> None:
    """Add DETR's keys (defaults as main.py's flags) to a Detectron2 config, in place."""
    cfg.MODEL.DETR = CN()
    # contiguous Detectron2 ids; 80 is COCO's (main.py's default 91 counts COCO's category ids, 11 unused)
    cfg.MODEL.DETR.NUM_CLASSES = 80
    cfg.MODEL.DETR.NUM_OBJECT_QUERIES = 100
    # transformer
    cfg.MODEL.DETR.HIDDEN_DIM = 256
    cfg.MODEL.DETR.NHEADS = 8
    cfg.MODEL.DETR.DIM_FEEDFORWARD = 2048
    cfg.MODEL.DETR.ENC_LAYERS = 6
    cfg.MODEL.DETR.DEC_LAYERS = 6
    cfg.MODEL.DETR.DROPOUT = 0.1
    cfg.MODEL.DETR.PRE_NORM = False
    cfg.MODEL.DETR.POSITION_EMBEDDING = "sine"  # or "learned"
    # auxiliary decoding losses (main.py's --no_aux_loss sets this to False)
    cfg.MODEL.DETR.DEEP_SUPERVISION = True
    # matcher costs
    cfg.MODEL.DETR.COST_CLASS = 1.0
    cfg.MODEL.DETR.COST_BBOX = 5.0
    cfg.MODEL.DETR.COST_GIOU = 2.0
    # loss weights (the class loss has weight 1)
    cfg.MODEL.DETR.L1_WEIGHT = 5.0
    cfg.MODEL.DETR.GIOU_WEIGHT = 2.0
    cfg.MODEL.DETR.MASK_WEIGHT = 1.0
    cfg.MODEL.DETR.DICE_WEIGHT = 1.0
    cfg.MODEL.DETR.NO_OBJECT_WEIGHT = 0.1
    # segmentation: a trained box model to freeze under the mask head ('' trains everything)
    cfg.MODEL.DETR.FROZEN_WEIGHTS = ""
    # panoptic output (needs MODEL.MASK_ON): queries scoring above the threshold make up the panoptic image
    cfg.MODEL.DETR.PANOPTIC_ON = False
    cfg.MODEL.DETR.PANOPTIC_THRESHOLD = 0.85

    # DETR's crop branch first resizes the shorter side to one of these sizes (no max size), then crops
    cfg.INPUT.CROP.PRE_RESIZE = (400, 500, 600)
    # "ADAMW" (DETR's) or "SGD"; the backbone learns at BASE_LR * BACKBONE_MULTIPLIER
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1


# main.py flag -> (config key, the config value that stands for the flag's default). The value is given where it is
# not the flag's default itself (a ratio, a depth, a dilation); the tests compare each with util/args.py.
MAIN_PY_FLAGS = {
    "lr": ("SOLVER.BASE_LR", None),
    "lr_backbone": ("SOLVER.BACKBONE_MULTIPLIER", lambda a: a.lr_backbone / a.lr),
    "weight_decay": ("SOLVER.WEIGHT_DECAY", None),
    "clip_max_norm": ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", None),
    "warmup_iters": ("SOLVER.WARMUP_ITERS", None),
    "frozen_weights": ("MODEL.DETR.FROZEN_WEIGHTS", lambda a: a.frozen_weights or ""),
    "backbone": ("MODEL.RESNETS.DEPTH", lambda a: int(a.backbone[len("resnet"):])),
    "dilation": ("MODEL.RESNETS.RES5_DILATION", lambda a: 2 if a.dilation else 1),
    "position_embedding": ("MODEL.DETR.POSITION_EMBEDDING", None),
    "enc_layers": ("MODEL.DETR.ENC_LAYERS", None),
    "dec_layers": ("MODEL.DETR.DEC_LAYERS", None),
    "dim_feedforward": ("MODEL.DETR.DIM_FEEDFORWARD", None),
    "hidden_dim": ("MODEL.DETR.HIDDEN_DIM", None),
    "dropout": ("MODEL.DETR.DROPOUT", None),
    "nheads": ("MODEL.DETR.NHEADS", None),
    "num_queries": ("MODEL.DETR.NUM_OBJECT_QUERIES", None),
    "pre_norm": ("MODEL.DETR.PRE_NORM", None),
    "masks": ("MODEL.MASK_ON", None),
    "panoptic_threshold": ("MODEL.DETR.PANOPTIC_THRESHOLD", None),
    "aux_loss": ("MODEL.DETR.DEEP_SUPERVISION", None),
    "set_cost_class": ("MODEL.DETR.COST_CLASS", None),
    "set_cost_bbox": ("MODEL.DETR.COST_BBOX", None),
    "set_cost_giou": ("MODEL.DETR.COST_GIOU", None),
    "mask_loss_coef": ("MODEL.DETR.MASK_WEIGHT", None),
    "dice_loss_coef": ("MODEL.DETR.DICE_WEIGHT", None),
    "bbox_loss_coef": ("MODEL.DETR.L1_WEIGHT", None),
    "giou_loss_coef": ("MODEL.DETR.GIOU_WEIGHT", None),
    "eos_coef": ("MODEL.DETR.NO_OBJECT_WEIGHT", None),
    "scales": ("INPUT.MIN_SIZE_TRAIN", lambda a: tuple(a.scales)),
    "max_size": ("INPUT.MAX_SIZE_TRAIN", None),
    "val_size": ("INPUT.MIN_SIZE_TEST", None),
    "crop_scales": ("INPUT.CROP.PRE_RESIZE", lambda a: tuple(a.crop_scales)),
    "crop_size": ("INPUT.CROP.SIZE", lambda a: tuple(a.crop_size)),
    "seed": ("SEED", None),
    "num_workers": ("DATALOADER.NUM_WORKERS", None),
    "output_dir": ("OUTPUT_DIR", None),
}

# main.py flags without a config key, and why.
NOT_IN_CONFIG = {
    "batch_size": "per process in main.py; SOLVER.IMS_PER_BATCH is the total over all processes",
    "epochs": "SOLVER.MAX_ITER counts iterations: epochs * images / SOLVER.IMS_PER_BATCH",
    "lr_drop": "SOLVER.STEPS counts iterations: lr_drop * images / SOLVER.IMS_PER_BATCH",
    "backbone_weights": "MODEL.WEIGHTS (a Detectron2 checkpoint; the configs name torchvision's ImageNet R-50)",
    "num_classes": "MODEL.DETR.NUM_CLASSES counts Detectron2's contiguous classes (80 for COCO), not category ids",
    "dataset_file": "DATASETS.TRAIN / DATASETS.TEST name registered Detectron2 datasets",
    "coco_path": "DATASETS.TRAIN / DATASETS.TEST name registered Detectron2 datasets",
    "coco_panoptic_path": "DATASETS.TRAIN / DATASETS.TEST name registered Detectron2 datasets",
    "remove_difficult": "unused in main.py too",
    "device": "MODEL.DEVICE (Detectron2's default is cuda)",
    "resume": "train_net.py --resume",
    "finetune": "MODEL.WEIGHTS with a converted checkpoint (Detectron2 skips weights of another shape)",
    "start_epoch": "the iteration is restored by train_net.py --resume",
    "eval": "train_net.py --eval-only",
    "amp": "SOLVER.AMP.ENABLED (Detectron2's own mixed precision)",
    "compile": "not offered by Detectron2's trainer",
    "aspect_ratio_grouping": "DATALOADER.ASPECT_RATIO_GROUPING (Detectron2 groups by default)",
    "coco_eval_backend": "Detectron2's COCOEvaluator (pycocotools, or its own fast C++ evaluation)",
    "dist_backend": "Detectron2's launch (NCCL on GPUs, gloo on CPU)",
    "dist_timeout": "Detectron2's launch (its own timeout argument)",
    "world_size": "train_net.py --num-gpus / --num-machines",
    "dist_url": "train_net.py --dist-url",
    "backbone_norm": "convergence aid of main.py's synthetic recipe; Detectron2: MODEL.RESNETS.NORM ('BN')",
    "backbone_last_layer": "convergence aid of main.py's synthetic recipe; Detectron2: MODEL.RESNETS.OUT_FEATURES",
    "backbone_blocks": "compute aid of main.py's synthetic recipe (a shallower trunk), not built by the wrapper",
    "train_backbone_stem": "convergence aid of main.py's synthetic recipe; Detectron2: MODEL.BACKBONE.FREEZE_AT 0",
    "pos_at_input": "convergence aid of main.py's synthetic recipe, not built by the wrapper",
    "spatial_prior": "convergence aid of main.py's synthetic recipe, not built by the wrapper",
    "query_groups": "convergence aid of main.py's synthetic recipe, not built by the wrapper",
    "two_stage": "main.py runs both panoptic stages in one command; here run train_net.py twice, the second with "
                 "MODEL.MASK_ON and MODEL.DETR.FROZEN_WEIGHTS",
}
