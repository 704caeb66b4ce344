from models.detr import build


def build_model(args):
    """Returns ``(model, criterion, postprocessors)``; see ``models.detr.build``."""
    return build(args)
