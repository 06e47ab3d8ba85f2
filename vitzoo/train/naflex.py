"""Patch-sequence training (NaFlex): images at their own aspect ratio, a patch budget per step, packed rows.

NaFlex (SigLIP 2, timm's NaFlex loader) trains one model for many resolutions: each step draws a patch budget
from a list of sequence lengths and resizes every image of the step, aspect ratio preserved, to at most that
many patches (:func:`vitzoo.packing.budget_size`). Steps are budgeted in tokens, not images: a micro-batch
holds ``max_tokens`` patches, so a step at a small budget holds more, smaller images and every step costs
about the same. The longest budget is the length of a row; at a smaller one a row holds as many images as
whole budgets fit in it (NaViT's patch-n-pack, Dehghani et al. 2023; attention is masked between them,
:func:`vitzoo.packing.pack_images`) instead of each paying for a row of padding.

The data position stays a function of the step alone, as on the image path (:mod:`vitzoo.train.loop`): the
budgets of an epoch's steps are drawn once from the seed (so every epoch has the same number of steps, and
each step a known number of images: timm's canonical schedule), each epoch takes them in its own seeded
order over its own permutation of the samples, and each image's random transform is seeded by
``(seed, epoch, sample)`` (:class:`~vitzoo.train.sampler.SeededSamples`). A resumed run, and a run with any
number of loader workers, packs the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from vitzoo.packing import budget_size, output_order, pack_images
from vitzoo.train.data import INTERPOLATION
from vitzoo.train.sampler import ResumableSampler, SeededSamples

if TYPE_CHECKING:
    from vitzoo.train.distributed import World
    from vitzoo.train.loop import TrainConfig


@dataclass(frozen=True)
class RowLayout:
    """How one micro-batch holds images of at most ``budget`` patches: ``rows`` rows of ``per_row`` images."""

    budget: int
    per_row: int
    rows: int

    @property
    def seq_len(self) -> int:
        """Patches in a row: whole budgets, so ``per_row`` images of at most ``budget`` patches always fit."""
        return self.per_row * self.budget

    @property
    def images(self) -> int:
        """Images in a micro-batch: first fit places each into a row, as every row has room for ``per_row``."""
        return self.per_row * self.rows


@dataclass(frozen=True)
class TokenBudget:
    """A micro-batch of ``max_tokens`` patches and the patch budgets (ascending) its images are resized to."""

    max_tokens: int
    budgets: tuple[int, ...]

    @classmethod
    def of(cls, max_tokens: int, seq_lens: Sequence[int]) -> TokenBudget:
        """The budgets of ``seq_lens`` that fit in ``max_tokens``; refused when none does."""
        budgets = tuple(sorted({n for n in seq_lens if n <= max_tokens}))
        if not budgets:
            raise ValueError(f"every sequence length of seq_lens={tuple(seq_lens)} is longer than "
                             f"max_tokens={max_tokens}, so no step could hold an image; raise max_tokens or "
                             f"lower seq_lens")
        return cls(max_tokens, budgets)

    def layout(self, budget: int) -> RowLayout:
        """Rows as long as the longest budget allows, holding whole budgets; a budget beyond the longest (an
        evaluation at a larger size) gets rows of its own length."""
        per_row = max(1, self.budgets[-1] // budget)
        return RowLayout(budget, per_row, max(1, self.max_tokens // (per_row * budget)))


def token_budget(config: TrainConfig) -> TokenBudget:
    """The token budget of ``config``'s patch-sequence steps."""
    return TokenBudget.of(config.max_tokens, config.seq_lens)


def epoch_schedule(tokens: TokenBudget, samples: int, accum_steps: int, seed: int) -> list[int]:
    """The budget of each step of an epoch in which a process has ``samples`` samples: drawn from ``seed``
    until the next step would need more images than are left (that tail is dropped each epoch, as the image
    path drops the samples that do not fill a step)."""
    generator = torch.Generator().manual_seed(seed)
    schedule: list[int] = []
    while True:
        budget = tokens.budgets[int(torch.randint(len(tokens.budgets), (), generator=generator))]
        need = tokens.layout(budget).images * accum_steps
        if need > samples:
            return schedule
        schedule.append(budget)
        samples -= need


def steps_in_epoch(size: int, config: TrainConfig, world_size: int) -> int:
    """Optimizer steps in one pass over ``size`` samples split over ``world_size`` processes."""
    return len(epoch_schedule(token_budget(config), size // world_size, config.accum_steps, config.seed))


class BudgetedSamples(Dataset):
    """``dataset``'s images resized, aspect ratio preserved, to at most a patch budget: item ``(index, budget)``
    is ``(image, label, budget)``. The budget travels with the key, so loader workers need no shared state."""

    def __init__(self, dataset: Dataset, patch_size: int, interpolation: str) -> None:
        self.dataset, self.patch_size = dataset, patch_size
        self.interpolation = INTERPOLATION[interpolation]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, Any, int]:
        index, budget = key
        image, label = self.dataset[index]
        size = budget_size(image.shape[-2], image.shape[-1], self.patch_size, budget)
        return T.functional.resize(image, list(size), interpolation=self.interpolation, antialias=True), label, budget


class PackedBatch:
    """Collate: ``(image, label, budget)`` items of one budget -> the patch-sequence dict of the budget's
    :class:`RowLayout` (always its full rows, so a budget is one shape) and the labels in the order of the
    model's outputs (:func:`vitzoo.packing.output_order`)."""

    def __init__(self, tokens: TokenBudget, patch_size: int) -> None:
        self.tokens, self.patch_size = tokens, patch_size

    def __call__(self, items: list[tuple[torch.Tensor, Any, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        images, labels, budgets = zip(*items, strict=True)
        layout = self.tokens.layout(budgets[0])
        batch, placements = pack_images(images, self.patch_size, layout.seq_len, layout.rows)
        labels = torch.stack([torch.as_tensor(label) for label in labels])
        return batch, labels[output_order(placements)]


def train_sequences(dataset: Dataset, config: TrainConfig, world: World, patch_size: int, interpolation: str,
                    epoch: int, done: int) -> DataLoader:
    """This process's patch-sequence micro-batches of ``epoch`` from its step ``done`` on."""
    tokens = token_budget(config)
    schedule = epoch_schedule(tokens, len(dataset) // world.world_size, config.accum_steps, config.seed)
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    order = [schedule[i] for i in torch.randperm(len(schedule), generator=generator).tolist()]
    budgets = [budget for budget in order for _ in range(config.accum_steps)]  # one per micro-batch
    first = done * config.accum_steps
    sampler = ResumableSampler(len(dataset), config.seed, world.rank, world.world_size)
    sampler.set_epoch(epoch, sum(tokens.layout(budget).images for budget in budgets[:first]))
    indices = iter(sampler)
    micro = [[(next(indices), budget) for _ in range(tokens.layout(budget).images)] for budget in budgets[first:]]
    samples = BudgetedSamples(SeededSamples(dataset, config.seed, epoch), patch_size, interpolation)
    # a private generator: creating the iterator must not draw from the global RNG (dropout's)
    return DataLoader(samples, batch_sampler=micro, collate_fn=PackedBatch(tokens, patch_size),
                      num_workers=config.num_workers, generator=torch.Generator().manual_seed(config.seed))


def eval_sequences(dataset: Dataset, tokens: TokenBudget, budget: int, patch_size: int,
                   interpolation: str) -> DataLoader:
    """``dataset`` in order as patch-sequence batches, every image at most ``budget`` patches."""
    per_batch = tokens.layout(budget).images
    keys = [(index, budget) for index in range(len(dataset))]
    chunks = [keys[start : start + per_batch] for start in range(0, len(keys), per_batch)]
    return DataLoader(BudgetedSamples(dataset, patch_size, interpolation), batch_sampler=chunks,
                      collate_fn=PackedBatch(tokens, patch_size), generator=torch.Generator())
