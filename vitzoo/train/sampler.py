"""A data order, and an augmentation, that depend only on (seed, epoch, sample).

Resuming a killed run must feed the same batches in the same order as the uninterrupted run; a
``RandomSampler`` drawing from a generator that has advanced an unknown amount cannot. Each epoch is
one permutation seeded by ``(seed, epoch)``, split across ranks like ``DistributedSampler``. The random
transforms of each sample draw from a generator seeded by ``(seed, epoch, index)``
(:class:`SeededSamples`), so they too are the same after a resume, with any number of loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


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


class RunSampler(Sampler[tuple[int, int]]):
    """``(epoch, index)`` keys of ``epochs`` (a :class:`ResumableSampler`) from ``skip`` samples into ``epoch`` on,
    epoch after epoch, each cut to its first ``per_epoch`` samples (the whole steps), ``samples`` in all: one
    loader, its workers started once, serves a whole run and reads ahead across epoch boundaries."""

    def __init__(self, epochs: ResumableSampler, per_epoch: int, epoch: int, skip: int, samples: int) -> None:
        self.epochs, self.per_epoch, self.epoch, self.skip, self.samples = epochs, per_epoch, epoch, skip, samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return islice(self._keys(), self.samples)

    def _keys(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self.skip
        while True:
            self.epochs.set_epoch(epoch, skip)
            yield from ((epoch, index) for index in islice(iter(self.epochs), self.per_epoch - skip))
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:
        return self.samples


class SeededSamples(Dataset):
    """``dataset`` whose item ``index`` in ``epoch`` is read with torch's CPU generator seeded by
    ``(seed, epoch, index)`` and restored afterwards: random transforms give the same result whichever
    worker process reads the sample and whatever ran before, and the caller's random streams (dropout's,
    with no workers) are left as they were. Transforms must draw from torch's CPU generator (torchvision's do).
    With ``epoch=None`` items are keyed ``(epoch, index)`` (:class:`RunSampler`): the epoch travels with the
    key, so loader workers need no shared state.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int | None = None) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if self.epoch is None else (self.epoch, key)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed would also reseed the accelerators' generators (dropout's
            # on a GPU, without loader workers) and costs 100x more, a sizeable part of a worker's time per image
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63)
            return self.dataset[index]
