"""Padded image batches: a tensor plus a boolean mask that is True on padding.

``NestedTensor`` is a TorchScript class, so scripted models take it as input, as the original's did.
"""
from typing import List, Optional, Union

import torch
from torch import Tensor


class NestedTensor:
    """A batch ``tensors`` ``[B, C, H, W]`` with ``mask`` ``[B, H, W]`` (True on padded pixels)."""

    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device: torch.device, non_blocking: bool = False) -> "NestedTensor":
        mask = self.mask
        if mask is not None:
            mask = mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def decompose(self) -> tuple[Tensor, Optional[Tensor]]:
        return self.tensors, self.mask

    @torch.jit.unused
    def __repr__(self) -> str:
        mask = None if self.mask is None else tuple(self.mask.shape)
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={mask})"


def nested_tensor_from_tensor_list(tensor_list: Union[List[Tensor], Tensor]) -> NestedTensor:
    """Pad a list of ``[C, H, W]`` tensors (or ``[N, H, W]`` masks) to a common size, bottom/right.

    A 4-D tensor is treated as a list of 3-D tensors (no padding, mask all False).
    """
    if len(tensor_list) == 0:
        raise ValueError("nested_tensor_from_tensor_list: got an empty list of images")
    if any(t.ndim != 3 for t in tensor_list):
        shapes = [tuple(t.shape) for t in tensor_list]
        raise ValueError(f"nested_tensor_from_tensor_list: expected 3-D tensors [C, H, W], got shapes {shapes}")
    max_size = [max(s) for s in zip(*[t.shape for t in tensor_list])]
    batch_shape = [len(tensor_list)] + max_size
    b, _, h, w = batch_shape
    first = tensor_list[0]
    tensor = torch.zeros(batch_shape, dtype=first.dtype, device=first.device)
    mask = torch.ones((b, h, w), dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(tensor_list, tensor, mask):
        pad_img[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensor, mask)


def collate_fn(batch):
    """Collate ``(image, target)`` pairs: images into a NestedTensor, targets into a tuple."""
    images, targets = tuple(zip(*batch))
    return nested_tensor_from_tensor_list(list(images)), targets


def interpolate(input: Tensor, size=None, scale_factor=None, mode: str = "nearest", align_corners=None) -> Tensor:
    """The original's ``util.misc.interpolate``: today simply ``torch.nn.functional.interpolate`` (which handles
    empty batches itself), kept so that users' imports work."""
    return torch.nn.functional.interpolate(input, size, scale_factor, mode, align_corners)
