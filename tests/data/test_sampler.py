import random

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from torch.utils.data import DataLoader, RandomSampler

from ftune.data.sampler import LengthGroupedSampler, RepeatedSteps, length_grouped_indices

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


def repeated_loader(rows: int, batch_size: int, step_batches: int, times: int):
    order = RandomSampler(range(rows), generator=torch.Generator().manual_seed(0))
    return prepare_data_loader(DataLoader(range(rows), batch_sampler=RepeatedSteps(order, batch_size, step_batches,
                                                                                   times)),
                               use_seedable_sampler=True, data_seed=0)


def test_each_steps_batches_come_times_in_a_row_and_an_incomplete_step_is_left_out():
    """13 rows in batches of 2 (the last of 1), steps of 2 batches, 3 times: 3 steps thrice; the 7th batch never."""
    loader = repeated_loader(13, batch_size=2, step_batches=2, times=3)
    loader.set_epoch(0)
    batches = [batch.tolist() for batch in loader]
    assert len(batches) == len(loader) == 18
    steps = [batches[i:i + 2] for i in range(0, 18, 2)]
    for first in (0, 3, 6):
        assert steps[first] == steps[first + 1] == steps[first + 2]
    assert steps[0] != steps[3] != steps[6]
    seen = [i for step in steps[::3] for batch in step for i in batch]
    assert len(seen) == len(set(seen)) == 12


def test_repeated_steps_shuffle_per_epoch_and_resume_at_a_batch():
    """The seedable sampler of accelerate orders the runs; skipping batches resumes inside a step's repeats."""
    loader = repeated_loader(16, batch_size=2, step_batches=2, times=2)
    orders = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        orders.append([batch.tolist() for batch in loader])
    assert orders[0] == orders[2] != orders[1]
    loader.set_epoch(0)
    assert [batch.tolist() for batch in skip_first_batches(loader, 3)] == orders[0][3:]
