"""DETR for Detectron2: importing this package registers the ``Detr`` meta-architecture."""
import sys
from pathlib import Path

if __name__ == "detr":  # ``import detr`` from inside d2/, as the original's: models/, util/ and d2/ are one level up
    _REPO = str(Path(__file__).resolve().parents[2])
    if _REPO not in sys.path:
        sys.path.insert(0, _REPO)

from .config import add_detr_config  # noqa: E402
from .dataset_mapper import DetrDatasetMapper  # noqa: E402
from .detr import Detr  # noqa: E402

__all__ = ["Detr", "DetrDatasetMapper", "add_detr_config"]
