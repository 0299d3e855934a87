"""Samplers: length-grouped batches (similar lengths, so padded batches waste few slots), and steps repeated.

Length-grouped sampling:

The order is transformers' `get_length_grouped_indices` (shuffle, cut into mega-batches of 50 batches, sort
each by length, longest batch first), computed with numpy on the array of row lengths: the transformers
function builds Python lists of every index, which for a million rows costs ~100 MB more than the lengths
themselves (a test checks the two orders are equal). The sampler reseeds it per epoch through `set_epoch`,
which accelerate calls through its prepared loader, so every epoch has its own order and a resumed run replays
the same one.
"""

import itertools

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler

MEGA_BATCH_MULT = 50
"""Batches per mega-batch (transformers' default, fewer for small sets)."""


class LengthGroupedSampler(Sampler[int]):
    """Indices ordered so that each run of `batch_size` holds examples of similar length, reseeded per epoch."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = np.asarray(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return (int(index) for index in length_grouped_indices(self.lengths, self.batch_size, generator))


def length_grouped_indices(lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> np.ndarray:
    """Transformers' `get_length_grouped_indices`, on numpy arrays.

    Example, lengths [1, 5, 2, 9, 3, 4], batch_size 1 (mega-batches of 1 row): the shuffle itself, with the
    longest row (9) swapped to the front.
    """
    mult = max(1, min(len(lengths) // (batch_size * 4), MEGA_BATCH_MULT))
    size = mult * batch_size
    indices = torch.randperm(len(lengths), generator=generator).numpy()
    megabatches = [chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.split(
        indices, range(size, len(indices), size))]
    longest = int(np.argmax([lengths[megabatch[0]] for megabatch in megabatches]))
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return np.concatenate(megabatches)


class RepeatedSteps(BatchSampler):
    """Batches in runs of one optimizer step's worth (`step_batches`), each run yielded `times` times in a row.

    For an objective that trains several steps on one draw of data (`grpo.num_iterations`): the loader itself
    repeats the step, so its length, the epoch and the resume position (`TrainState.batch_in_epoch`) count every
    step that trains on it, and the loop needs no notion of reuse. An incomplete last run is left out (TRL leaves
    out an incomplete generation batch), since the loop would otherwise join its repeats into one step. accelerate
    replaces `sampler` with its seedable one and reaches it through `set_epoch`, as for a plain `BatchSampler`; on
    several processes a run is the step's batches of every process (`step_batches` = accumulation x processes),
    which accelerate deals out one per process in turn.
    """

    def __init__(self, sampler: Sampler, batch_size: int, step_batches: int, times: int):
        super().__init__(sampler, batch_size, drop_last=False)
        self.step_batches, self.times = step_batches, times

    def __len__(self) -> int:
        return super().__len__() // self.step_batches * self.step_batches * self.times

    def __iter__(self):
        batches = super().__iter__()
        while len(run := list(itertools.islice(batches, self.step_batches))) == self.step_batches:
            for _ in range(self.times):
                yield from run
