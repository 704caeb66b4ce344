"""ResNet backbone returning padded feature maps, joined with the positional encoding."""
import logging
import os
from typing import Dict, Final, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d  # eps=1e-5, as the original's

from models.position_encoding import build_position_encoding
from util.errors import UserFileNotFoundError, UserRuntimeError
from util.nested_tensor import NestedTensor

logger = logging.getLogger(__name__)

__all__ = ["Backbone", "BackboneBase", "FrozenBatchNorm2d", "Joiner", "build_backbone", "load_backbone_weights"]


class _FoldableFrozenBN(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d, able to hand its affine map to the preceding convolution."""

    def scale_shift(self) -> Tuple[Tensor, Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale


class _ConvFrozenBN(nn.Conv2d):
    """nn.Conv2d that can run with a frozen batch norm folded into it: one convolution with weight * scale and
    bias shift, instead of a convolution then two passes over its output. Exact in training too (the norm is
    constant, and autograd sees the scaled weight), up to float rounding."""

    def conv_bn(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        bias = self.bias
        if bias is not None:
            shift = shift + bias * scale
        return F.conv2d(x, self.weight * scale.reshape(-1, 1, 1, 1), shift, self.stride, self.padding,
                        self.dilation, self.groups)


class _FoldedBasicBlock(torchvision.models.resnet.BasicBlock):
    """torchvision's BasicBlock with its frozen batch norms folded into the convolutions (same parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.bn1.scale_shift()
        out = self.relu(self.conv1.conv_bn(x, scale, shift))
        scale, shift = self.bn2.scale_shift()
        out = self.conv2.conv_bn(out, scale, shift)
        identity = x
        if self.downsample is not None:
            scale, shift = self.downsample[1].scale_shift()
            identity = self.downsample[0].conv_bn(x, scale, shift)
        out += identity
        return self.relu(out)


class _FoldedBottleneck(torchvision.models.resnet.Bottleneck):
    """torchvision's Bottleneck with its frozen batch norms folded into the convolutions (same parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.bn1.scale_shift()
        out = self.relu(self.conv1.conv_bn(x, scale, shift))
        scale, shift = self.bn2.scale_shift()
        out = self.relu(self.conv2.conv_bn(out, scale, shift))
        scale, shift = self.bn3.scale_shift()
        out = self.conv3.conv_bn(out, scale, shift)
        identity = x
        if self.downsample is not None:
            scale, shift = self.downsample[1].scale_shift()
            identity = self.downsample[0].conv_bn(x, scale, shift)
        out += identity
        return self.relu(out)


def fold_frozen_batch_norms(resnet: torchvision.models.ResNet) -> None:
    """Make a ResNet with FrozenBatchNorm2d run its norms folded into the convolutions. Only methods change (the
    modules' classes get subclasses adding them): parameters, buffers and state-dict keys stay as they are."""
    folded_blocks = {torchvision.models.resnet.BasicBlock: _FoldedBasicBlock,
                     torchvision.models.resnet.Bottleneck: _FoldedBottleneck}
    for module in resnet.modules():
        if type(module) in folded_blocks:
            module.__class__ = folded_blocks[type(module)]
        elif type(module) is FrozenBatchNorm2d:
            module.__class__ = _FoldableFrozenBN
        elif type(module) is nn.Conv2d:
            module.__class__ = _ConvFrozenBN


def unfold_frozen_batch_norms(resnet: nn.Module) -> None:
    """Undo ``fold_frozen_batch_norms``: the plain torchvision modules again (the reference path, for comparisons)."""
    plain = {_FoldedBasicBlock: torchvision.models.resnet.BasicBlock,
             _FoldedBottleneck: torchvision.models.resnet.Bottleneck,
             _FoldableFrozenBN: FrozenBatchNorm2d, _ConvFrozenBN: nn.Conv2d}
    for module in resnet.modules():
        if type(module) in plain:
            module.__class__ = plain[type(module)]
    for module in resnet.modules():
        if isinstance(module, BackboneBase):
            module.folded = False


class BackboneBase(nn.Module):
    """Wraps a ResNet trunk; returns a dict of NestedTensors (feature map + downsampled padding mask).

    Only layer2..layer4 are trained (the stem and layer1 stay frozen, as in the original) unless
    ``train_all_layers``; nothing is trained when ``train_backbone`` is False. A ResNet with frozen batch norm
    runs with the norms folded into its convolutions (``fold_frozen_batch_norms``; same results, faster).
    With ``channels_last`` the trunk runs on channels-last tensors (faster convolutions on CPUs, see
    tools/benchmarks/cpu.py); outputs are the same.
    """
    folded: Final[bool]
    channels_last: Final[bool]

    def __init__(self, backbone: nn.Module, train_backbone: bool, num_channels: int, return_interm_layers: bool,
                 last_layer: str = "layer4", train_all_layers: bool = False, channels_last: bool = False):
        super().__init__()
        trainable = ("layer2", "layer3", "layer4")
        for name, parameter in backbone.named_parameters():
            if not train_backbone or not (train_all_layers or any(layer in name for layer in trainable)):
                parameter.requires_grad_(False)
        layers = ["layer1", "layer2", "layer3", "layer4"]
        layers = layers[: layers.index(last_layer) + 1]
        if return_interm_layers:
            return_layers = {name: str(i) for i, name in enumerate(layers)}
        else:
            return_layers = {last_layer: "0"}
        self.folded = isinstance(backbone, torchvision.models.ResNet) and isinstance(backbone.bn1, FrozenBatchNorm2d)
        if self.folded:
            fold_frozen_batch_norms(backbone)
        self.body = IntermediateLayerGetter(backbone, return_layers=return_layers)
        self.return_layers = return_layers
        self.num_channels = num_channels
        self.channels_last = channels_last

    def forward(self, tensor_list: NestedTensor) -> Dict[str, NestedTensor]:
        m = tensor_list.mask
        if m is None:
            raise ValueError("Backbone: the NestedTensor has no padding mask; build it with "
                             "nested_tensor_from_tensor_list")
        x = tensor_list.tensors
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        body = self.body
        if self.folded:
            scale, shift = body.bn1.scale_shift()
            x = body.conv1.conv_bn(x, scale, shift)
        else:
            x = body.bn1(body.conv1(x))
        x = body.maxpool(body.relu(x))
        out: Dict[str, NestedTensor] = {}
        for name, layer in body.items():
            if name.startswith("layer"):
                x = layer(x)
                if name in self.return_layers:
                    mask = F.interpolate(m[None].float(), size=x.shape[-2:]).to(torch.bool)[0]  # [B, h, w]
                    out[self.return_layers[name]] = NestedTensor(x.contiguous(), mask)
        return out


class Backbone(BackboneBase):
    """A torchvision ResNet with frozen batch norm, randomly initialised (load weights explicitly).

    ``norm`` 'frozen_bn' (the original) or 'bn' (trainable BatchNorm, for training from scratch);
    ``last_layer`` 'layer4' (stride 32, the original) or 'layer3' (stride 16); ``blocks`` > 0 keeps only that many
    residual blocks per stage (0: all, the original); ``channels_last`` (default) runs
    the trunk on channels-last tensors: on CPU 0.8x the time of R50 inference at 800x1066 (with the folded norms,
    0.65x of the plain trunk; tools/benchmarks/cpu.py), no slower in training.
    """

    def __init__(self, name: str, train_backbone: bool, return_interm_layers: bool, dilation: bool,
                 norm: str = "frozen_bn", last_layer: str = "layer4", train_all_layers: bool = False,
                 channels_last: bool = True, blocks: int = 0):
        if norm not in ("frozen_bn", "bn"):
            raise ValueError(f"Backbone: norm must be 'frozen_bn' or 'bn', got {norm!r}")
        if last_layer not in ("layer3", "layer4"):
            raise ValueError(f"Backbone: last_layer must be 'layer3' or 'layer4', got {last_layer!r}")
        norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
        # Never downloads: weights=None; pretrained weights are loaded explicitly by load_backbone_weights.
        backbone = _build_resnet(name, weights=None, replace_stride_with_dilation=[False, False, dilation],
                                 norm_layer=norm_layer)
        if blocks < 0:
            raise ValueError(f"Backbone: blocks must be >= 0 (0: all), got {blocks}")
        if blocks:
            # a shallower trunk: each stage keeps its first `blocks` blocks (the first one strides and widens), and
            # their state-dict keys (layerN.0, layerN.1, ...): ImageNet weights of the full ResNet still load
            for i in range(1, 5):
                setattr(backbone, f"layer{i}", getattr(backbone, f"layer{i}")[:blocks])
        layer4_channels = backbone.fc.in_features  # 512 for resnet18/34, 2048 for the bottleneck ResNets
        num_channels = layer4_channels if last_layer == "layer4" else layer4_channels // 2
        super().__init__(backbone, train_backbone, num_channels, return_interm_layers, last_layer, train_all_layers,
                         channels_last)
        self.name = name


def resnet_names() -> list[str]:
    """The torchvision classification models that are ResNets (resnet*, resnext*, wide_resnet*)."""
    return [n for n in torchvision.models.list_models(module=torchvision.models)
            if n.startswith(("resnet", "resnext", "wide_resnet"))]


def _build_resnet(name: str, **kwargs) -> torchvision.models.ResNet:
    """Any torchvision ResNet by name, as the original accepted (resnet50, resnext101_32x8d, wide_resnet50_2...)."""
    if name not in resnet_names():
        raise ValueError(f"--backbone: {name!r} is not a torchvision ResNet; expected one of "
                         f"{', '.join(resnet_names())}")
    model = torchvision.models.get_model(name, **kwargs)
    if not isinstance(model, torchvision.models.ResNet):
        raise ValueError(f"--backbone: torchvision's {name!r} is not a ResNet")
    return model


class Joiner(nn.Sequential):
    """``Joiner(backbone, position_embedding)``: returns the feature maps and one positional encoding each."""

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)

    def forward(self, tensor_list: NestedTensor) -> Tuple[List[NestedTensor], List[torch.Tensor]]:
        xs = self[0](tensor_list)
        out: List[NestedTensor] = []
        pos: List[torch.Tensor] = []
        for _, x in xs.items():
            out.append(x)
            pos.append(self[1](x).to(x.tensors.dtype))
        return out, pos


def _imagenet_url(name: str) -> str:
    weights = torchvision.models.get_model_weights(name)
    return weights.IMAGENET1K_V1.url  # the ImageNet weights the original DETR started from


def load_backbone_weights(backbone: Backbone, spec: str) -> Optional[str]:
    """Load ResNet weights into ``backbone.body``: 'none', 'imagenet' (torchvision's V1 weights from the torch
    hub cache, downloaded if possible) or a path to a ResNet state dict. Returns where they came from."""
    if spec == "none":
        return None
    if spec == "imagenet":
        url = _imagenet_url(backbone.name)
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False)
        except Exception as err:  # no network, proxy, disk ...: say what to do instead
            if os.path.exists(cached):
                raise UserRuntimeError(
                    f"--backbone_weights imagenet: the cached file {cached} could not be read ({type(err).__name__}: "
                    f"{err}); delete it to download it again, or pass --backbone_weights PATH / none") from err
            raise UserRuntimeError(
                f"--backbone_weights imagenet: the ImageNet weights of {backbone.name} are not in the torch hub cache "
                f"({cached}) and could not be downloaded from {url} ({type(err).__name__}: {err}). Put the file "
                f"there (or set TORCH_HOME), pass --backbone_weights PATH to a ResNet state dict, or "
                f"--backbone_weights none to start from random weights.") from err
        source = cached
    else:
        if not os.path.isfile(spec):
            raise UserFileNotFoundError(
                f"--backbone_weights: {spec!r} is not a file; expected 'imagenet', 'none' or a path to a ResNet "
                f"state dict")
        state = torch.load(spec, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        source = spec
    body = backbone.body
    own = body.state_dict()
    # the classifier (fc) and, with a layer3 cut, layer4 are not part of the body
    usable = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(
            f"--backbone_weights {source}: not a {backbone.name} state dict; {len(missing)} backbone keys are "
            f"missing, e.g. {missing[:5]}")
    bad_shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in usable.items() if v.shape != own[k].shape]
    if bad_shapes:
        raise ValueError(f"--backbone_weights {source}: shape mismatch (key, file, model): {bad_shapes[:5]}")
    body.load_state_dict(usable, strict=False)
    logger.info("Loaded backbone weights from %s", source)
    return source


def build_backbone(args) -> Joiner:
    position_embedding = build_position_encoding(args)
    train_backbone = args.lr_backbone > 0
    return_interm_layers = args.masks
    backbone = Backbone(args.backbone, train_backbone, return_interm_layers, args.dilation,
                        norm=getattr(args, "backbone_norm", "frozen_bn"),
                        last_layer=getattr(args, "backbone_last_layer", "layer4"),
                        train_all_layers=getattr(args, "train_backbone_stem", False),
                        blocks=getattr(args, "backbone_blocks", 0))
    model = Joiner(backbone, position_embedding)
    model.num_channels = backbone.num_channels
    return model
