"""COCO panoptic PNG colours <-> segment ids (id = R + 256 G + 256^2 B), with panopticapi's own ``rgb2id`` / ``id2rgb``.

panopticapi is optional (``pip install --no-deps panopticapi-lite==0.2.0``, see requirements.txt): it is imported when
first needed, so that importing models/ (e.g. through ``torch.hub.load``) works without it, and a missing install
stops with how to install it.
"""
import importlib
from types import ModuleType

import numpy as np

INSTALL_HINT = "pip install --no-deps panopticapi-lite==0.2.0"


def import_panopticapi(module: str, needed_for: str) -> ModuleType:
    """``panopticapi.<module>``, or an ImportError that says what needs it and how to install it."""
    try:
        return importlib.import_module(f"panopticapi.{module}")
    except ImportError as e:
        raise ImportError(f"{needed_for} needs panopticapi: `{INSTALL_HINT}` (its numpy<2 pin and extra "
                          f"dependencies are not needed by the code used here)") from e


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] COCO panoptic PNG colours (e.g. uint8) -> [H, W] int64 segment ids."""
    utils = import_panopticapi("utils", "reading a COCO panoptic PNG")
    # int64 in, int64 out: panopticapi would turn uint8 into int32
    return utils.rgb2id(np.asarray(rgb, dtype=np.int64))


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """[H, W] integer segment ids -> [H, W, 3] uint8 COCO panoptic PNG colours."""
    utils = import_panopticapi("utils", "writing a COCO panoptic PNG")
    return utils.id2rgb(np.asarray(id_map, dtype=np.int64))
