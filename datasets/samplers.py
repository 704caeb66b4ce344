"""Batching images of similar shape together, so that fewer pixels of a padded batch are padding."""
from typing import Iterator, Sequence

import torch.utils.data


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of ``batch_size`` indices from ``sampler``, each batch drawn from one group (e.g. landscape vs
    portrait images), in the sampler's order otherwise (as Detectron2's aspect-ratio grouping does).

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


def aspect_ratio_groups(dataset) -> list[int]:
    """0 for portrait, 1 for landscape images of a COCO-format dataset (from the annotation file's sizes, without
    opening the images); through torch Subsets too."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, torch.utils.data.Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    images = dataset.coco.imgs
    return [int(images[dataset.ids[i]]["width"] >= images[dataset.ids[i]]["height"]) for i in indices]
