"""DETR for Detectron2: importing this package registers the ``Detr`` meta-architecture."""
from .config import add_detr_config
from .dataset_mapper import DetrDatasetMapper
from .detr import Detr

__all__ = ["Detr", "DetrDatasetMapper", "add_detr_config"]
