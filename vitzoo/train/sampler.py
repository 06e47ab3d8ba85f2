"""A data order that depends only on (seed, epoch) and can start in the middle of an epoch.

Resuming a killed run must feed the same batches in the same order as the uninterrupted run; a
``RandomSampler`` drawing from a generator that has advanced an unknown amount cannot. Each epoch is
one permutation seeded by ``(seed, epoch)``, split across ranks like ``DistributedSampler``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled indices for one rank; ``set_epoch(epoch, skip)`` starts after ``skip`` samples of this rank."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if size < world_size:
            raise ValueError(f"the training set has {size} samples, fewer than the {world_size} processes")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.per_rank = size // world_size  # the tail that does not divide evenly is dropped each epoch
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)[: self.per_rank * self.world_size]
        return iter(order[self.rank :: self.world_size][self.skip :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.skip
