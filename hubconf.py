"""torch.hub entrypoints with the original DETR's names, signatures and checkpoint URLs.

    model = torch.hub.load("path/to/this/repo", "detr_resnet50", source="local", pretrained=True)

Models are built and loaded by ``models.loader.load_model`` (the published models' URLs and flags are its
``PUBLISHED`` table), through ``models.build_model`` from ``main.py``'s parser defaults plus overrides, so hub
models and trained models can never drift apart. ``pretrained=True`` goes through
``torch.hub.load_state_dict_from_url``: a file already in ``$TORCH_HOME/hub/checkpoints/`` is used offline.
"""
from models.loader import load_model

dependencies = ["torch", "torchvision"]


def _make_detr(name: str, pretrained: bool, num_classes: int, threshold: float = 0.85):
    # with another num_classes than the checkpoint's, the class head keeps its fresh initialisation (fine-tuning),
    # with a warning. Offline, the error says where to put the file (torch.hub.load cannot take a local path instead)
    loaded = load_model(name, device="cpu", pretrained=pretrained,
                        overrides={"num_classes": num_classes, "panoptic_threshold": threshold})
    # in training mode, as the original's hub models came (load_model gives it ready for inference)
    return loaded.model.train(), loaded.postprocessors


def detr_resnet50(pretrained=False, num_classes=91, return_postprocessor=False):
    """DETR R50 with 6 encoder and 6 decoder layers. Achieves 42.0 AP on COCO val5k."""
    model, post = _make_detr("detr_resnet50", pretrained, num_classes)
    return (model, post["bbox"]) if return_postprocessor else model


def detr_resnet50_dc5(pretrained=False, num_classes=91, return_postprocessor=False):
    """DETR-DC5 R50 (dilated last stage). Achieves 43.3 AP on COCO val5k."""
    model, post = _make_detr("detr_resnet50_dc5", pretrained, num_classes)
    return (model, post["bbox"]) if return_postprocessor else model


def detr_resnet101(pretrained=False, num_classes=91, return_postprocessor=False):
    """DETR R101 with 6 encoder and 6 decoder layers. Achieves 43.5 AP on COCO val5k."""
    model, post = _make_detr("detr_resnet101", pretrained, num_classes)
    return (model, post["bbox"]) if return_postprocessor else model


def detr_resnet101_dc5(pretrained=False, num_classes=91, return_postprocessor=False):
    """DETR-DC5 R101 (dilated last stage). Achieves 44.9 AP on COCO val5k."""
    model, post = _make_detr("detr_resnet101_dc5", pretrained, num_classes)
    return (model, post["bbox"]) if return_postprocessor else model


def _panoptic(name, pretrained, num_classes, threshold, return_postprocessor):
    model, postprocessors = _make_detr(name, pretrained, num_classes, threshold)
    return (model, postprocessors["panoptic"]) if return_postprocessor else model


def detr_resnet50_panoptic(pretrained=False, num_classes=250, threshold=0.85, return_postprocessor=False):
    """DETR R50 panoptic. Achieves 43.4 PQ on COCO val5k. ``threshold``: minimum class confidence of a segment."""
    return _panoptic("detr_resnet50_panoptic", pretrained, num_classes, threshold, return_postprocessor)


def detr_resnet50_dc5_panoptic(pretrained=False, num_classes=250, threshold=0.85, return_postprocessor=False):
    """DETR-DC5 R50 panoptic. Achieves 44.6 PQ on COCO val5k."""
    return _panoptic("detr_resnet50_dc5_panoptic", pretrained, num_classes, threshold, return_postprocessor)


def detr_resnet101_panoptic(pretrained=False, num_classes=250, threshold=0.85, return_postprocessor=False):
    """DETR R101 panoptic. Achieves 45.1 PQ on COCO val5k."""
    return _panoptic("detr_resnet101_panoptic", pretrained, num_classes, threshold, return_postprocessor)
