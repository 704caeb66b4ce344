"""main.py's flags and the Detectron2 wrapper: which config key stands for each flag, which flags have none and why.

Pure Python (no Detectron2), so that ``d2/converter.py``, which needs only torch, reads the same table as
``d2/detr/config.py``: a checkpoint trained with a flag in ``NOT_BUILT`` at a non-default value does not convert.
"""

__all__ = ["MAIN_PY_FLAGS", "NOT_BUILT", "NOT_IN_CONFIG"]

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

# main.py flags that change the model into one the wrapper's ``Detr`` does not build, and why. A checkpoint trained
# with any of them at a value other than main.py's default does not convert: d2/converter.py names the flag.
NOT_BUILT = {
    "backbone_norm": "convergence aid of main.py's synthetic recipe (trainable BatchNorm); the wrapper builds the "
                     "published DETR's frozen batch norm",
    "backbone_last_layer": "convergence aid of main.py's synthetic recipe (features of layer3, stride 16); the wrapper "
                           "builds the published DETR on res5",
    "backbone_blocks": "compute aid of main.py's synthetic recipe (a shallower trunk), not built by the wrapper",
    "pos_at_input": "convergence aid of main.py's synthetic recipe, not built by the wrapper",
    "spatial_prior": "convergence aid of main.py's synthetic recipe, not built by the wrapper",
    "query_groups": "convergence aid of main.py's synthetic recipe, not built by the wrapper",
}

# main.py flags without a config key, and why (NOT_BUILT among them).
NOT_IN_CONFIG = {
    "batch_size": "per process in main.py; SOLVER.IMS_PER_BATCH is the total over all processes",
    "epochs": "SOLVER.MAX_ITER counts iterations: epochs * images / SOLVER.IMS_PER_BATCH",
    "lr_drop": "SOLVER.STEPS counts iterations: lr_drop * images / SOLVER.IMS_PER_BATCH",
    "backbone_weights": "MODEL.WEIGHTS (a Detectron2 checkpoint; the configs name torchvision's ImageNet R-50)",
    "num_classes": "MODEL.DETR.NUM_CLASSES counts Detectron2's contiguous classes (80 for COCO), not category ids",
    "dataset_file": "DATASETS.TRAIN / DATASETS.TEST name registered Detectron2 datasets",
    "coco_path": "DATASETS.TRAIN / DATASETS.TEST name registered Detectron2 datasets",
    "coco_panoptic_path": "DATASETS.TRAIN / DATASETS.TEST name registered Detectron2 datasets",
    "train_json": "DATASETS.TRAIN / DATASETS.TEST name registered Detectron2 datasets (register_coco_instances)",
    "train_images": "DATASETS.TRAIN / DATASETS.TEST name registered Detectron2 datasets (register_coco_instances)",
    "val_json": "DATASETS.TRAIN / DATASETS.TEST name registered Detectron2 datasets (register_coco_instances)",
    "val_images": "DATASETS.TRAIN / DATASETS.TEST name registered Detectron2 datasets (register_coco_instances)",
    "remove_difficult": "unused in main.py too",
    "device": "MODEL.DEVICE (Detectron2's default is cuda)",
    "resume": "train_net.py --resume",
    "finetune": "MODEL.WEIGHTS with a converted checkpoint (Detectron2 skips weights of another shape)",
    "start_epoch": "the iteration is restored by train_net.py --resume",
    "eval": "train_net.py --eval-only",
    "amp": "SOLVER.AMP.ENABLED (Detectron2's own mixed precision)",
    "compile": "not offered by Detectron2's trainer",
    "accum_steps": "Detectron2's trainer has no gradient accumulation (SOLVER.IMS_PER_BATCH is the whole batch)",
    "aspect_ratio_grouping": "DATALOADER.ASPECT_RATIO_GROUPING (Detectron2 groups by default)",
    "coco_eval_backend": "Detectron2's COCOEvaluator (pycocotools, or its own fast C++ evaluation)",
    "eval_every": "TEST.EVAL_PERIOD counts iterations (0: only after training)",
    "tensorboard": "Detectron2's trainer writes TensorBoard events (and metrics.json) into OUTPUT_DIR itself",
    "dist_backend": "Detectron2's launch (NCCL on GPUs, gloo on CPU)",
    "dist_timeout": "Detectron2's launch (its own timeout argument)",
    "world_size": "train_net.py --num-gpus / --num-machines",
    "dist_url": "train_net.py --dist-url",
    "train_backbone_stem": "convergence aid of main.py's synthetic recipe; Detectron2: MODEL.BACKBONE.FREEZE_AT 0",
    "two_stage": "main.py runs both panoptic stages in one command; here run train_net.py twice, the second with "
                 "MODEL.MASK_ON and MODEL.DETR.FROZEN_WEIGHTS",
    **NOT_BUILT,
}
