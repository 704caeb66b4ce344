"""torch.hub entrypoints with the original DETR's names, signatures and checkpoint URLs.

    model = torch.hub.load("path/to/this/repo", "detr_resnet50", source="local", pretrained=True)

Models are built through ``models.build_model`` from ``main.py``'s parser defaults plus overrides, so hub
models and trained models can never drift apart. ``pretrained=True`` goes through
``torch.hub.load_state_dict_from_url``: a file already in ``$TORCH_HOME/hub/checkpoints/`` is used offline.
"""
from models import build_model
from util.args import get_args_parser
from util.checkpoint import load_checkpoint, load_model_state

dependencies = ["torch", "torchvision"]

_URLS = {
    "detr_resnet50": "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
    "detr_resnet50_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-f0fb7ef5.pth",
    "detr_resnet101": "https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth",
    "detr_resnet101_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r101-dc5-a2e86def.pth",
    "detr_resnet50_panoptic": "https://dl.fbaipublicfiles.com/detr/detr-r50-panoptic-00ce5173.pth",
    "detr_resnet50_dc5_panoptic": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-panoptic-da08f1b1.pth",
    "detr_resnet101_panoptic": "https://dl.fbaipublicfiles.com/detr/detr-r101-panoptic-40021d53.pth",
}


def _hub_args(backbone: str, dilation: bool, num_classes: int, mask: bool, threshold: float = 0.85):
    args = get_args_parser().parse_args([])
    args.backbone = backbone
    args.dilation = dilation
    args.num_classes = num_classes
    args.masks = mask
    args.aux_loss = False  # the original hub models return no aux_outputs
    # coco_panoptic: build_model takes its thing ids from util.args.KNOWN_THING_IDS (ids up to 90, as the
    # published models were trained) for the panoptic post-processor
    args.dataset_file = "coco_panoptic" if mask else "coco"
    args.panoptic_threshold = threshold
    args.device = "cpu"
    args.backbone_weights = "none"  # the hub checkpoint holds the backbone; never download ImageNet weights
    return args


def _make_detr(name: str, backbone: str, dilation: bool, num_classes: int, pretrained: bool, mask: bool = False,
               threshold: float = 0.85):
    model, _, postprocessors = build_model(_hub_args(backbone, dilation, num_classes, mask, threshold))
    if pretrained:
        # through the hub cache; reads the published Namespace args. Offline, the error says where to put the file
        # (torch.hub.load cannot take a local path instead)
        checkpoint = load_checkpoint(_URLS[name], local_path_ok=False)
        # with another num_classes the class head keeps its fresh initialisation (fine-tuning), with a warning
        load_model_state(model, checkpoint["model"], source=_URLS[name], reinit_class_head=True)
    return model, postprocessors


def detr_resnet50(pretrained=False, num_classes=91, return_postprocessor=False):
    """DETR R50 with 6 encoder and 6 decoder layers. Achieves 42.0 AP on COCO val5k."""
    model, post = _make_detr("detr_resnet50", "resnet50", False, num_classes, pretrained)
    return (model, post["bbox"]) if return_postprocessor else model


def detr_resnet50_dc5(pretrained=False, num_classes=91, return_postprocessor=False):
    """DETR-DC5 R50 (dilated last stage). Achieves 43.3 AP on COCO val5k."""
    model, post = _make_detr("detr_resnet50_dc5", "resnet50", True, num_classes, pretrained)
    return (model, post["bbox"]) if return_postprocessor else model


def detr_resnet101(pretrained=False, num_classes=91, return_postprocessor=False):
    """DETR R101 with 6 encoder and 6 decoder layers. Achieves 43.5 AP on COCO val5k."""
    model, post = _make_detr("detr_resnet101", "resnet101", False, num_classes, pretrained)
    return (model, post["bbox"]) if return_postprocessor else model


def detr_resnet101_dc5(pretrained=False, num_classes=91, return_postprocessor=False):
    """DETR-DC5 R101 (dilated last stage). Achieves 44.9 AP on COCO val5k."""
    model, post = _make_detr("detr_resnet101_dc5", "resnet101", True, num_classes, pretrained)
    return (model, post["bbox"]) if return_postprocessor else model


def _panoptic(name, backbone, dilation, pretrained, num_classes, threshold, return_postprocessor):
    model, post = _make_detr(name, backbone, dilation, num_classes, pretrained, mask=True, threshold=threshold)
    return (model, post["panoptic"]) if return_postprocessor else model


def detr_resnet50_panoptic(pretrained=False, num_classes=250, threshold=0.85, return_postprocessor=False):
    """DETR R50 panoptic. Achieves 43.4 PQ on COCO val5k. ``threshold``: minimum class confidence of a segment."""
    return _panoptic("detr_resnet50_panoptic", "resnet50", False, pretrained, num_classes, threshold,
                     return_postprocessor)


def detr_resnet50_dc5_panoptic(pretrained=False, num_classes=250, threshold=0.85, return_postprocessor=False):
    """DETR-DC5 R50 panoptic. Achieves 44.6 PQ on COCO val5k."""
    return _panoptic("detr_resnet50_dc5_panoptic", "resnet50", True, pretrained, num_classes, threshold,
                     return_postprocessor)


def detr_resnet101_panoptic(pretrained=False, num_classes=250, threshold=0.85, return_postprocessor=False):
    """DETR R101 panoptic. Achieves 45.1 PQ on COCO val5k."""
    return _panoptic("detr_resnet101_panoptic", "resnet101", False, pretrained, num_classes, threshold,
                     return_postprocessor)
