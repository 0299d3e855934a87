import random

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from ftune.data.sampler import LengthGroupedSampler, length_grouped_indices

RNG = random.Random(0)
LENGTHS = [RNG.randint(5, 200) for _ in range(400)]


def padded_slots(order: list[int], batch_size: int) -> int:
    """Token slots of right-padded batches taken in `order`."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(LENGTHS[i] for i in batch) * len(batch) for batch in batches)


def test_every_example_once_and_far_less_padding_than_a_shuffle():
    order = list(LengthGroupedSampler(LENGTHS, batch_size=4, seed=0))
    assert sorted(order) == list(range(len(LENGTHS)))
    shuffled = random.Random(1).sample(range(len(LENGTHS)), len(LENGTHS))
    real = sum(LENGTHS)
    assert real / padded_slots(order, 4) > 0.95
    assert real / padded_slots(shuffled, 4) < 0.8


@pytest.mark.parametrize("seed, epoch, same", [(0, 0, True), (0, 1, False), (1, 0, False)])
def test_the_order_depends_only_on_seed_and_epoch(seed, epoch, same):
    sampler = LengthGroupedSampler(LENGTHS, batch_size=4, seed=seed)
    sampler.set_epoch(epoch)
    reference = list(LengthGroupedSampler(LENGTHS, batch_size=4, seed=0))
    assert (list(sampler) == reference) is same
    assert list(sampler) == list(sampler)  # iterating does not advance any state: resume replays the epoch


def test_accelerate_passes_set_epoch_through_to_the_sampler():
    sampler = LengthGroupedSampler(LENGTHS, batch_size=4, seed=0)
    loader = prepare_data_loader(DataLoader(range(len(LENGTHS)), batch_size=4, sampler=sampler),
                                 use_seedable_sampler=True)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        expected = LengthGroupedSampler(LENGTHS, batch_size=4, seed=0)
        expected.set_epoch(epoch)
        assert [int(i) for batch in loader for i in batch] == list(expected)


@pytest.mark.parametrize("count, batch_size", [(400, 4), (37, 8), (5, 4), (1000, 1)])
def test_the_numpy_order_is_transformers_length_grouped_order(count, batch_size):
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = np.array([RNG.randint(1, 50) for _ in range(count)])  # many ties: the sort must be stable
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        expected = get_length_grouped_indices(lengths.tolist(), batch_size, generator=generator)
        ours = length_grouped_indices(lengths, batch_size, torch.Generator().manual_seed(seed))
        assert ours.tolist() == expected
