"""datasets.samplers: batches grouped by aspect ratio (--aspect_ratio_grouping), on one process and several,
for detection and panoptic datasets."""
import collections
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler, Subset

import datasets
from datasets import synthetic
from datasets.samplers import GroupedBatchSampler, aspect_ratio_groups
from conftest import make_args

# 23 indices in 3 groups of unequal sizes (11, 8, 4)
GROUP_IDS = [0, 1, 0, 2, 0, 1, 1, 0, 2, 0, 0, 1, 0, 1, 2, 0, 1, 0, 2, 1, 0, 1, 0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("samplers") / "data", seed=5, num_train=10, num_val=2,
                              image_size=64)


def _batches(sampler, batch_size, drop_last, group_ids=GROUP_IDS):
    return list(GroupedBatchSampler(sampler, group_ids, batch_size, drop_last))


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_batches_hold_one_group_until_the_leftovers(batch_size):
    sampler = RandomSampler(range(len(GROUP_IDS)), generator=torch.Generator().manual_seed(0))
    batches = _batches(sampler, batch_size, drop_last=False)
    counts = collections.Counter(GROUP_IDS)
    # every group yields its full batches first; then what is left of each group (fewer than a batch), mixed
    full = sum(n // batch_size for n in counts.values())
    for batch in batches[:full]:
        assert len(batch) == batch_size and len({GROUP_IDS[i] for i in batch}) == 1
    leftovers = [i for batch in batches[full:] for i in batch]
    assert sorted(collections.Counter(GROUP_IDS[i] for i in leftovers).values()) == \
        sorted(n % batch_size for n in counts.values() if n % batch_size)


def test_every_index_once_per_epoch():
    n = len(GROUP_IDS)
    batches = _batches(SequentialSampler(range(n)), 4, drop_last=False)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert len(batches) == len(GroupedBatchSampler(SequentialSampler(range(n)), GROUP_IDS, 4, False)) == 6
    # in the sampler's order within a group: group 0 is 0, 2, 4, 7, then 9, 10, 12, 15
    assert batches[0] == [0, 2, 4, 7]
    # drop_last: as many batches as a plain BatchSampler (23 // 4), all full, each index at most once, and only
    # the last incomplete batch's indices (23 % 4 = 3) left out
    batches = _batches(SequentialSampler(range(n)), 4, drop_last=True)
    seen = [i for b in batches for i in b]
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    assert len(set(seen)) == len(seen) == n - 3


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [2, 3, 5])
def test_every_rank_gets_the_same_number_of_batches(drop_last, batch_size):
    # each rank's share of the groups differs, but DDP needs every rank to run the same number of steps
    counts = set()
    for epoch in range(3):
        for rank in range(2):
            sampler = DistributedSampler(range(len(GROUP_IDS)), num_replicas=2, rank=rank, shuffle=True, seed=1)
            sampler.set_epoch(epoch)
            batch_sampler = GroupedBatchSampler(sampler, GROUP_IDS, batch_size, drop_last)
            batches = list(batch_sampler)
            assert len(batches) == len(batch_sampler)
            counts.add(len(batches))
    assert len(counts) == 1


def test_groups_of_a_panoptic_dataset(data_dir):
    # the panoptic loader has no pycocotools index: the sizes come from its own JSON, the same images as the
    # detection annotations'
    panoptic = datasets.build_dataset("train", make_args(dataset_file="synthetic_panoptic", coco_path=str(data_dir)))
    detection = datasets.build_dataset("train", make_args(dataset_file="synthetic", coco_path=str(data_dir)))
    groups = aspect_ratio_groups(panoptic)
    assert groups == aspect_ratio_groups(detection) and len(groups) == 10 and len(set(groups)) > 1
    sizes = [panoptic.get_height_and_width(i) for i in range(len(panoptic))]
    edges = [2 ** (j / 3) for j in range(-3, 4)]
    assert groups == [sum(w / h >= e for e in edges) for h, w in sizes]
    assert aspect_ratio_groups(Subset(panoptic, [4, 1])) == [groups[4], groups[1]]


def test_aspect_ratio_grouping_on_a_panoptic_dataset_in_main(data_dir):
    import main

    args = make_args(dataset_file="synthetic_panoptic", coco_path=str(data_dir), aspect_ratio_grouping=True,
                     batch_size=3, num_workers=0)
    args.distributed = False
    loader_train, _, _, _ = main.build_loaders(args)
    assert isinstance(loader_train.batch_sampler, GroupedBatchSampler)
    batches = list(loader_train.batch_sampler)
    assert len(batches) == 3 and all(len(b) == 3 for b in batches)  # 10 images, the last partial batch dropped
