"""The category names (and panoptic thing ids) a Predictor labels its predictions with.

A model's names come from its checkpoint (``main.py`` records the dataset's); the published checkpoints carry none:
their classes are COCO's, whose names live in ``datasets/coco_categories.py``. A caller can also give them: 'coco',
'coco_panoptic', a {id: name} dict, or a JSON file (a COCO annotation file or a {id: name} object).
"""
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from datasets.coco_categories import COCO_CATEGORY_NAMES, COCO_PANOPTIC_CATEGORY_NAMES, COCO_PANOPTIC_THING_IDS
from models.loader import LoadedModel

logger = logging.getLogger(__name__)

CategoryNames = Union[None, str, Dict[int, str]]


def resolve_categories(names: CategoryNames) -> Tuple[Optional[Dict[int, str]], Optional[List[int]]]:
    """The names and the panoptic thing ids of None, 'coco', 'coco_panoptic', a {id: name} dict, or a JSON file: a
    COCO annotation file (its 'categories'; thing ids when every category has 'isthing', as panoptic files do) or
    a {id: name} object (no thing ids). The file is read once."""
    if names is None or isinstance(names, dict):
        return (None if names is None else {int(k): str(v) for k, v in names.items()}), None
    if names == "coco":
        return dict(COCO_CATEGORY_NAMES), None
    if names == "coco_panoptic":
        return dict(COCO_PANOPTIC_CATEGORY_NAMES), list(COCO_PANOPTIC_THING_IDS)
    path = Path(names)
    if not path.is_file():
        raise ValueError(f"category names {names!r}: expected 'coco', 'coco_panoptic' or a JSON file")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a COCO annotation file (with 'categories') or a JSON object {{id: name}}")
    if "categories" not in data:
        try:
            return {int(k): str(v) for k, v in data.items()}, None
        except ValueError:
            raise ValueError(f"{path}: expected a COCO annotation file (with 'categories') or a JSON object "
                             f"{{id: name}}") from None
    try:
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: 'categories' must be a list of {{'id', 'name'}} objects ({err})") from None
    thing_ids = None
    if all("isthing" in c for c in data["categories"] or [{}]):
        thing_ids = [int(c["id"]) for c in data["categories"] if c["isthing"]]
    return names, thing_ids


def resolve_category_names(names: CategoryNames) -> Optional[Dict[int, str]]:
    """The names of ``resolve_categories``."""
    return resolve_categories(names)[0]


def loaded_category_names(loaded: LoadedModel) -> CategoryNames:
    """The names of a ``models.loader.load_model`` model: its checkpoint's, else COCO's for the published models,
    else None (the predictions are labelled with their ids)."""
    if loaded.category_names is not None:
        logger.info("category names: from the checkpoint (%d categories)", len(loaded.category_names))
        return loaded.category_names
    if loaded.published is not None:
        logger.info("category names: COCO's (%s is a published COCO model)", loaded.published)
        return "coco_panoptic" if loaded.args.get("dataset_file") == "coco_panoptic" else "coco"
    return None
