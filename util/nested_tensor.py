"""Padded image batches: a tensor plus a boolean mask that is True on padding.

``NestedTensor`` is a TorchScript class, so scripted models take it as input, as the original's did.
"""
from typing import List, Optional

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


def nested_tensor_from_tensor_list(tensor_list: List[Tensor]) -> NestedTensor:
    """Pad a list of ``[C, H, W]`` tensors (or ``[N, H, W]`` masks) to a common size, bottom/right.

    Scriptable, also inside a user's scripted module, as the original's. In eager mode a 4-D tensor is also taken,
    as a list of 3-D tensors (no padding, mask all False).
    """
    if len(tensor_list) == 0:
        raise ValueError("nested_tensor_from_tensor_list: got an empty list of images")
    max_size: List[int] = [0, 0, 0]
    for t in tensor_list:
        if t.dim() != 3:
            raise ValueError("nested_tensor_from_tensor_list: expected 3-D tensors [C, H, W], got a tensor of shape "
                             + str(t.shape))
        for i in range(3):
            max_size[i] = max(max_size[i], t.shape[i])
    first = tensor_list[0]
    c, h, w = max_size
    tensor = torch.zeros([len(tensor_list), c, h, w], dtype=first.dtype, device=first.device)
    mask = torch.ones([len(tensor_list), h, w], dtype=torch.bool, device=first.device)
    for i, img in enumerate(tensor_list):
        tensor[i, : img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        mask[i, : img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensor, mask)


def collate_fn(batch):
    """Collate ``(image, target)`` pairs: images into a NestedTensor, targets into a tuple."""
    images, targets = tuple(zip(*batch))
    return nested_tensor_from_tensor_list(list(images)), targets


def interpolate(input: Tensor, size: Optional[List[int]] = None, scale_factor: Optional[float] = None,
                mode: str = "nearest", align_corners: Optional[bool] = None) -> Tensor:
    """The original's ``util.misc.interpolate``: today simply ``torch.nn.functional.interpolate`` (which handles
    empty batches itself), kept so that users' imports work."""
    return torch.nn.functional.interpolate(input, size, scale_factor, mode, align_corners)
