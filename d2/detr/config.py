"""DETR's hyper-parameters as Detectron2 config keys.

``add_detr_config`` adds the keys Detectron2 does not have, with ``main.py``'s defaults. The hyper-parameters that
Detectron2 already has a key for (learning rate, input sizes, ...) are set by the shipped configs in
``d2/configs/``; ``MAIN_PY_FLAGS`` (in ``d2/flags.py``, re-exported here) says which key stands for which ``main.py``
flag, and the tests check that the shipped configs give every one of them ``main.py``'s default.
"""
from detectron2.config import CfgNode as CN

from d2.flags import MAIN_PY_FLAGS, NOT_BUILT, NOT_IN_CONFIG

__all__ = ["add_detr_config", "MAIN_PY_FLAGS", "NOT_BUILT", "NOT_IN_CONFIG"]


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
