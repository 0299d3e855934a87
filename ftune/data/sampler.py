"""Length-grouped sampling: batches of similar lengths, so padded batches waste few slots.

transformers' `get_length_grouped_indices` does the grouping (shuffle, cut into mega-batches of 50 batches,
sort each by length); this sampler only reseeds it per epoch through `set_epoch`, which accelerate calls
through its prepared loader, so every epoch has its own order and a resumed run replays the same one.
"""

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class LengthGroupedSampler(Sampler[int]):
    """Indices ordered so that each run of `batch_size` holds examples of similar length, reseeded per epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
