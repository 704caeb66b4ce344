"""Detectron2 dataset dicts -> model inputs, with DETR's augmentation.

Training, as ``datasets.transforms.make_coco_transforms('train')``: a horizontal flip with probability 0.5, then
with probability 0.5 a resize of the shorter side to one of ``INPUT.MIN_SIZE_TRAIN`` (longer side at most
``INPUT.MAX_SIZE_TRAIN``), otherwise a resize to one of ``INPUT.CROP.PRE_RESIZE``, a random crop of
``INPUT.CROP.SIZE`` (each side uniformly in [min, max], "absolute_range") and the same multi-scale resize
(without ``INPUT.CROP.ENABLED`` the crop branch is never taken). Evaluation: the shorter side to
``INPUT.MIN_SIZE_TEST``, the longer at most ``INPUT.MAX_SIZE_TEST``.

Instance annotations (``annotations``, from ``register_coco_instances``) and COCO panoptic annotations
(``pan_seg_file_name`` + ``segments_info``, from ``register_coco_panoptic``) both become ``instances`` with
``gt_boxes``, ``gt_classes`` and, with ``MODEL.MASK_ON``, ``gt_masks``. Crowd annotations are dropped and so are
objects left empty by the crop, as in ``datasets/coco.py``.
"""
import copy
import logging

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances

from util.box_ops import masks_to_boxes
from util.panoptic import rgb2id

__all__ = ["DetrDatasetMapper", "build_augmentations"]

logger = logging.getLogger(__name__)


def build_augmentations(cfg: CfgNode, is_train: bool) -> tuple[list, list]:
    """(the plain pipeline, the crop pipeline); the crop pipeline is empty at test time or without crops."""
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")], []
    flip = [T.RandomFlip(horizontal=True, vertical=False)] if cfg.INPUT.RANDOM_FLIP == "horizontal" else []
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                  cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    plain = flip + [resize]
    crop = []
    if cfg.INPUT.CROP.ENABLED:
        if cfg.INPUT.CROP.TYPE != "absolute_range":
            raise ValueError(f"INPUT.CROP.TYPE: DETR's crop is 'absolute_range', got {cfg.INPUT.CROP.TYPE!r}")
        crop = flip + [T.ResizeShortestEdge(cfg.INPUT.CROP.PRE_RESIZE, max_size=np.iinfo(np.int64).max,
                                            sample_style="choice"),
                       T.RandomCrop("absolute_range", cfg.INPUT.CROP.SIZE), resize]
    return plain, crop


class DetrDatasetMapper:
    """A callable: one Detectron2 dataset dict -> ``{'image': uint8 [3, H, W], 'instances', 'height', ...}``."""

    def __init__(self, cfg: CfgNode, is_train: bool = True):
        self.plain, self.crop = build_augmentations(cfg, is_train)
        self.is_train = is_train
        self.mask_on = cfg.MODEL.MASK_ON
        self.img_format = cfg.INPUT.FORMAT
        self.mask_format = cfg.INPUT.MASK_FORMAT
        logger.info("DETR augmentation (%s): %s%s", "train" if is_train else "test", self.plain,
                    f"; crop branch (p=0.5): {self.crop}" if self.crop else "")

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.img_format)
        utils.check_image_size(dataset_dict, image)
        pan_seg = None
        if self.is_train and "pan_seg_file_name" in dataset_dict:
            # COCO panoptic PNG -> segment ids, transformed like a semantic map
            pan_seg = rgb2id(utils.read_image(dataset_dict.pop("pan_seg_file_name"), "RGB")).astype(np.float64)

        augs = self.crop if self.crop and np.random.rand() < 0.5 else self.plain
        aug_input = T.AugInput(image, sem_seg=pan_seg)
        transforms = T.AugmentationList(augs)(aug_input)
        image, pan_seg = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]  # (h, w)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("pan_seg_file_name", None)
            return dataset_dict
        if pan_seg is not None:
            dataset_dict["instances"] = self._panoptic_instances(pan_seg, dataset_dict.pop("segments_info"),
                                                                 image_shape)
        elif "annotations" in dataset_dict:
            annos = []
            for obj in dataset_dict.pop("annotations"):
                if obj.get("iscrowd", 0):
                    continue
                obj.pop("keypoints", None)
                if not self.mask_on:
                    obj.pop("segmentation", None)
                annos.append(utils.transform_instance_annotations(obj, transforms, image_shape))
            instances = utils.annotations_to_instances(annos, image_shape, mask_format=self.mask_format)
            dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict

    def _panoptic_instances(self, pan_seg: np.ndarray, segments_info: list, image_shape: tuple) -> Instances:
        """One instance per non-crowd segment still visible after the augmentation; boxes from the masks
        (``util.box_ops.masks_to_boxes``, as the original's panoptic dataset)."""
        pan_seg = np.rint(pan_seg).astype(np.int64)
        segments = [s for s in segments_info if not s.get("iscrowd", 0)]
        masks = torch.from_numpy(np.stack([pan_seg == s["id"] for s in segments]) if segments
                                 else np.zeros((0, *image_shape), dtype=bool))
        classes = torch.tensor([s["category_id"] for s in segments], dtype=torch.int64)
        keep = masks.flatten(1).any(1)
        instances = Instances(image_shape)
        instances.gt_classes = classes[keep]
        instances.gt_masks = BitMasks(masks[keep])
        instances.gt_boxes = Boxes(masks_to_boxes(masks[keep]))
        return utils.filter_empty_instances(instances)
