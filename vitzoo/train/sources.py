"""Data at scale: ``hf:`` (Hugging Face ``datasets``) and ``wds:`` (webdataset tar shards) as map-style datasets.

Both are read by index, so they go through the same :class:`~vitzoo.train.sampler.ResumableSampler` and
:class:`~vitzoo.train.sampler.SeededSamples` as an ImageFolder: the data order and every random crop depend only
on (seed, epoch, sample), and a killed run resumes bit-identically, with any number of loader workers. A reader
(:mod:`vitzoo.train.hf_data`, :mod:`vitzoo.train.shards`) says how many samples there are, their labels and class
names, and decodes image ``i``; :class:`Images` adds the model's transform. Where a source has no validation split
of its own, ``val_fraction`` of each class is held out, fixed by the seed, as for an ImageFolder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from vitzoo.fields import check_fields, described
from vitzoo.train.hf_data import hf_readers
from vitzoo.train.shards import shard_reader

PREFIXES = ("hf:", "wds:")


@dataclass
class DataOptions:
    """How ``hf:`` and ``wds:`` data are read (the other sources ignore these); every field changes the data, so
    a resumed run must keep them."""

    val_data: str | None = described(None, "a separate validation set for --data wds:..., e.g. "
                                     "wds:shards/val-{000000..000001}.tar (None: val_fraction of each class held "
                                     "out of the training shards)")
    hf_split: str = described("train", "with --data hf:...: the split to train on (read by index from the "
                              "memory-mapped dataset; streaming is not offered, as exact resume reads each epoch's "
                              "samples by index)")
    hf_val_split: str | None = described(None, "with --data hf:...: the split to validate on (None: validation, "
                                         "val, valid or test, whichever the dataset has, else val_fraction of each "
                                         "class held out of the training split)")
    image_column: str | None = described(None, "with --data hf:...: the image column (None: the one Image feature)")
    label_column: str | None = described(None, "with --data hf:...: the label column (None: the one ClassLabel "
                                         "feature, else a column named label or labels)")

    def __post_init__(self) -> None:
        check_fields(self)


class Reader(Protocol):
    """What :class:`Images` needs of a source: labels (a tensor, one per sample), class names, decoding."""

    labels: torch.Tensor
    classes: list[str]

    def image(self, index: int) -> Image.Image: ...


class Images(Dataset):
    """``(transform(image), label)`` for each sample of ``reader``; ``classes`` as an ImageFolder has them."""

    def __init__(self, reader: Reader, transform: Any) -> None:
        self.reader, self.transform, self.classes = reader, transform, reader.classes

    def __len__(self) -> int:
        return len(self.reader.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.reader.image(index)), int(self.reader.labels[index])


def held_out(reader: Reader, transforms: tuple[Any, Any], val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, val) of one reader: ``val_fraction`` of each class in val, fixed by ``seed`` (as for an ImageFolder)."""
    from vitzoo.train.data import stratified_split  # data.py dispatches hf:/wds: here, so it imports this module

    train_idx, val_idx = stratified_split(reader.labels, val_fraction, seed)
    return Subset(Images(reader, transforms[0]), train_idx), Subset(Images(reader, transforms[1]), val_idx)


def source_datasets(source: str, transforms: tuple[Any, Any], options: DataOptions, val_fraction: float,
                    seed: int, num_classes: int | None) -> tuple[Dataset, Dataset]:
    """(train, val) for ``hf:...`` or ``wds:...``; ``transforms`` are (train, val).

    ``num_classes``: what the caller expects; tar shards' integer labels do not say how many classes there are
    (the largest label + 1 is all they tell), so a larger count given is taken.
    """
    kind, _, where = source.partition(":")
    if not where:
        raise ValueError(f"--data {source} names no data: write {kind}:PATH" + (
            " (or a hub name)" if kind == "hf" else ", e.g. wds:shards/train-{000000..000003}.tar"))
    if options.val_data and kind != "wds":
        raise ValueError(f"--val-data is for --data wds:...; an hf: dataset names its validation split with "
                         f"--hf-val-split (now {options.val_data!r} given with --data {source})")
    if kind == "hf":
        train, val = hf_readers(where, options)
    else:
        train = shard_reader(where, num_classes)
        val = None
        if options.val_data:
            if not options.val_data.startswith("wds:"):
                raise ValueError(f"--val-data {options.val_data} must be wds:PATTERN, like --data {source}")
            val = shard_reader(options.val_data.removeprefix("wds:"), num_classes)
            classes = max(len(train.classes), len(val.classes))
            train.classes = val.classes = [str(i) for i in range(classes)]
    if val is None:
        return held_out(train, transforms, val_fraction, seed)
    if train.classes != val.classes:
        raise ValueError(f"the training and validation data of {source} have other classes: {train.classes} vs "
                         f"{val.classes}; point them at one dataset's splits")
    return Images(train, transforms[0]), Images(val, transforms[1])
