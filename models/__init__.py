from models.detr import build
from models.loader import LoadedModel, load_model  # noqa: F401  (from a checkpoint, URL or hub name to a model)


def build_model(args):
    """Returns ``(model, criterion, postprocessors)``; see ``models.detr.build``."""
    return build(args)
