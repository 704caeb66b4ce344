"""Batching images of similar shape together, so that fewer pixels of a padded batch are padding."""
import bisect
from typing import Iterator, Sequence

import torch.utils.data

from .coco import DatasetError


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of ``batch_size`` indices from ``sampler``, each batch drawn from one group (e.g. images of similar
    aspect ratio), in the sampler's order otherwise (as torchvision's detection references and Detectron2 group).

    Indices left over in partly filled groups at the end are batched together, mixed; with ``drop_last`` a final
    incomplete batch is dropped. Either way there are exactly as many batches as a plain BatchSampler gives.
    """

    def __init__(self, sampler: torch.utils.data.Sampler, group_ids: Sequence[int], batch_size: int,
                 drop_last: bool):
        if batch_size < 1:
            raise ValueError(f"GroupedBatchSampler: batch_size must be at least 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = group_ids
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = {}
        for index in self.sampler:
            buffer = buffers.setdefault(self.group_ids[index], [])
            buffer.append(index)
            if len(buffer) == self.batch_size:
                yield list(buffer)
                buffer.clear()
        rest = [index for buffer in buffers.values() for index in buffer]
        for start in range(0, len(rest), self.batch_size):
            batch = rest[start:start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def _height_and_width(dataset, index: int) -> tuple[int, int]:
    """An image's size from the annotation file: ``get_height_and_width`` where the dataset has it (the panoptic
    dataset, torchvision's convention), else its pycocotools index (``CocoDetection``)."""
    if hasattr(dataset, "get_height_and_width"):
        return dataset.get_height_and_width(index)
    image = dataset.coco.imgs[dataset.ids[index]]
    for key in ("width", "height"):
        if key not in image:
            raise DatasetError(f"{dataset.ann_file}: image_id {image['id']} has no '{key}': --aspect_ratio_grouping "
                               f"reads each image's size from the annotation file (add the sizes, or leave the flag "
                               f"out)")
    return image["height"], image["width"]


def aspect_ratio_groups(dataset, k: int = 3) -> list[int]:
    """Group ids by aspect ratio (width / height) for a COCO-format detection or panoptic dataset, from the
    annotation file's sizes (images are not opened); through torch Subsets too. The bins are
    2 ** linspace(-1, 1, 2k + 1), as torchvision's detection references use: with k = 3 ratios split at 0.5, 0.63,
    0.79, 1, 1.26, 1.59, 2."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, torch.utils.data.Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    sizes = [_height_and_width(dataset, i) for i in indices]
    ratios = [w / h for h, w in sizes]
    edges = [2 ** (j / k) for j in range(-k, k + 1)]
    return [bisect.bisect_right(edges, r) for r in ratios]
