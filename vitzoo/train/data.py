"""Datasets for fine-tuning and ablations: the embedded digits, ImageFolder trees, torchvision sets.

Every source comes back as (train, val) datasets of ``(image tensor, label)`` with transforms that
match the model's ``pretrained_cfg`` (input size, mean/std, interpolation, crop), so a pretrained
model sees images the way it was trained to see them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from einops import rearrange, repeat
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2 as T

from vitzoo.arguments import add_options, parsed_fields
from vitzoo.errors import did_you_mean
from vitzoo.train.sources import PREFIXES, DataOptions, source_datasets

logger = logging.getLogger("vitzoo.data")

INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                 "nearest": T.InterpolationMode.NEAREST}


class RandomRegion(T.RandomResizedCrop):
    """RandomResizedCrop's region (a random share of the area at a random aspect ratio) kept at its own size.

    Patch-sequence training resizes each image later, aspect ratio preserved, to the patch budget of its step;
    resizing here to a fixed size first would throw the aspect ratio away.
    """

    def __init__(self) -> None:
        super().__init__(size=1)  # never used: the region is not resized

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(T.functional.crop, inpt, **params)


def image_transforms(cfg: dict[str, Any], train: bool, native: bool = False, pixels: bool = False) -> T.Compose:
    """torchvision transforms for a model's ``pretrained_cfg``.

    Eval: resize the short side to ``size / crop_pct``, center-crop ``size`` (timm's recipe).
    Train: random resized crop and horizontal flip, the standard light augmentation.
    ``native``: images keep their own size and aspect ratio (train: a random region and a flip; eval: the
    whole image), for patch sequences, which resize them to a patch budget (:mod:`vitzoo.train.naflex`).
    ``pixels``: stop before normalising, at uint8 ``(c, h, w)`` tensors, which :func:`vitzoo.train.fit`
    normalises where it trains: a quarter of float32's bytes through the loader workers' shared memory and
    pinned memory, and one fused pass over the batch on the device instead of one per image in a worker.
    """
    _, height, width = cfg["input_size"]
    interpolation = INTERPOLATION[cfg.get("interpolation", "bicubic")]
    if native:
        geometry = [RandomRegion(), T.RandomHorizontalFlip()] if train else []
    elif train:
        geometry = [T.RandomResizedCrop((height, width), interpolation=interpolation, antialias=True),
                    T.RandomHorizontalFlip()]
    else:
        short = int(min(height, width) / cfg.get("crop_pct", 1.0))
        geometry = [T.Resize(short, interpolation=interpolation, antialias=True), T.CenterCrop((height, width))]
    # geometry first: PIL images are resized by PIL, exactly as timm's transforms do
    last = T.ToPureTensor() if pixels else Normalized(cfg["mean"], cfg["std"])
    return T.Compose([*geometry, T.ToImage(), last])


class Normalized:
    """An image scaled to [0, 1] and normalised, ``(x / max - mean) / std``, computed as one multiply-add,
    ``x * (1 / (max * std)) - mean / std``: torchvision's ToDtype(scale=True) and Normalize make three passes
    over the pixels and, with decoding and cropping, this is most of a loader worker's time per image.
    ``max`` is the integer type's largest value (255 for uint8); a float image is taken as scaled already.
    Images ``(c, h, w)`` or batches ``(b, c, h, w)`` on ``device``."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: str | torch.device = "cpu") -> None:
        std_t = rearrange(torch.tensor(std, dtype=torch.float32, device=device), "c -> c 1 1")
        mean_t = rearrange(torch.tensor(mean, dtype=torch.float32, device=device), "c -> c 1 1")
        self.scale, self.shift = 1.0 / std_t, -mean_t / std_t

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        scale = self.scale if image.is_floating_point() else self.scale / torch.iinfo(image.dtype).max
        return torch.addcmul(self.shift, image.as_subclass(torch.Tensor).to(torch.float32), scale)


class Resized(Dataset):
    """``dataset`` with every image resized to ``size`` x ``size``: a model that takes any image size evaluated
    at another resolution than it trained at."""

    def __init__(self, dataset: Dataset, size: int, interpolation: str) -> None:
        self.dataset, self.size, self.interpolation = dataset, size, INTERPOLATION[interpolation]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label = self.dataset[index]
        return T.functional.resize(image, [self.size, self.size], interpolation=self.interpolation,
                                   antialias=True), label


def data_config(model: torch.nn.Module) -> dict[str, Any]:
    """What a model expects of its input images, from its ``pretrained_cfg`` (timm's data-config keys)."""
    cfg = model.pretrained_cfg
    return {"input_size": tuple(cfg["input_size"]), "interpolation": cfg["interpolation"],
            "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "crop_pct": cfg["crop_pct"]}


def eval_transform(model: torch.nn.Module) -> T.Compose:
    """The evaluation transform for ``model``'s weights: resize, center crop, normalize (timm's)."""
    return image_transforms(data_config(model), train=False)


def digits(cfg: dict[str, Any], val_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """scikit-learn's 1,797 handwritten 8x8 digits (10 classes), resized to the model's input.

    Small, real and offline: the default for demos and ablations. The split is stratified and fixed
    by ``seed``; images are resized once (bilinear) and normalised with the model's mean/std.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target)
    channels, height, width = cfg["input_size"]
    images = repeat(images, "n h w -> n c h w", c=channels)
    images = torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    mean = rearrange(torch.tensor(cfg["mean"][:channels]), "c -> 1 c 1 1")
    std = rearrange(torch.tensor(cfg["std"][:channels]), "c -> 1 c 1 1")
    images = (images - mean) / std
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    full = TensorDataset(images, labels)
    return Subset(full, train_idx), Subset(full, val_idx)


def _shuffled_classes(labels: torch.Tensor, seed: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(label, that class's indices in an order fixed by ``seed``), class by class in label order."""
    generator = torch.Generator().manual_seed(seed)
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        yield label, members[torch.randperm(len(members), generator=generator)]


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted (train, val) indices holding ``val_fraction`` of every class in val, fixed by ``seed``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    val_idx, train_idx = [], []
    for _, members in _shuffled_classes(labels, seed):
        n_val = round(len(members) * val_fraction)
        val_idx += members[:n_val].tolist()
        train_idx += members[n_val:].tolist()
    return sorted(train_idx), sorted(val_idx)


def dataset_labels(dataset: Dataset) -> torch.Tensor | None:
    """Every sample's label, where the dataset holds them apart from the images (digits, an ImageFolder,
    torchvision's datasets with ``targets``, subsets of these); None where only reading each sample would tell."""
    if isinstance(dataset, Subset):
        labels = dataset_labels(dataset.dataset)
        return None if labels is None else labels[list(dataset.indices)]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    targets = getattr(dataset, "targets", None)
    return None if targets is None else torch.as_tensor(targets)


def labelled_subset(dataset: Dataset, per_class: int, seed: int) -> Subset:
    """``per_class`` training samples of every class, drawn with ``seed``: fine-tuning with few labels, as in
    semi-supervised and few-shot studies (the samples left out are not used)."""
    labels = dataset_labels(dataset)
    if labels is None:
        raise ValueError(f"labels_per_class needs the labels of the training data apart from its images (digits, an "
                         f"ImageFolder, a torchvision dataset with targets); {type(dataset).__name__} has none")
    chosen = []
    for label, members in _shuffled_classes(labels, seed):
        if len(members) < per_class:
            raise ValueError(f"class {label} has {len(members)} training samples, fewer than labels_per_class="
                             f"{per_class}; ask for at most {len(members)}")
        chosen += members[:per_class].tolist()
    return Subset(dataset, sorted(chosen))


def read_image(path: str) -> Image.Image:
    """Open an image as RGB, naming the file when it cannot be read (instead of a PIL traceback)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path} ({type(err).__name__}: {err}); delete or replace it") from None


def _class_folders(root: Path) -> None:
    """Refuse a folder that is not an ImageFolder tree before torchvision's terser errors do."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist; an ImageFolder dataset is a folder of class folders "
                                f"(<root>/<class>/*.jpg), optionally split into <root>/train and <root>/val")
    empty = sorted(d.name for d in root.iterdir() if d.is_dir() and not any(p.is_file() for p in d.rglob("*")))
    if empty:
        raise ValueError(f"class folders without images in {root}: {', '.join(empty)}; add images or remove them")


def _folder(root: Path, transform: T.Compose) -> datasets.ImageFolder:
    _class_folders(root)
    return datasets.ImageFolder(root, transform=transform, loader=read_image)


def _split_roots(root: Path) -> list[Path]:
    """``[root/train, root/val]`` for a tree split on disk, else ``[root]`` (split per class when loaded)."""
    return [root / "train", root / "val"] if (root / "train").is_dir() else [root]


def check_images(source: str) -> int:
    """Decode every image of the ImageFolder ``source`` now; the number checked.

    A damaged file otherwise stops training when the sampler first reaches it, possibly hours in;
    here every bad file is named at once. Uses the reader training uses, so what passes here loads there.
    """
    if source == "digits" or source.startswith(("torchvision:", *PREFIXES)):
        raise ValueError(f"--check-images checks the files of an ImageFolder; --data {source} has none to check")
    paths = []
    for root in _split_roots(Path(source)):
        _class_folders(root)
        paths += [path for path, _ in datasets.ImageFolder(root, loader=read_image).samples]
    bad = []
    for path in paths:
        try:
            read_image(path)
        except ValueError:
            bad.append(path)
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"{len(bad)} of {len(paths)} images in {source} cannot be read: {shown}; "
                         f"delete or replace them")
    logger.info("checked %d images in %s: all readable", len(paths), source)
    return len(paths)


def image_folder(root: str | Path, transforms: tuple[T.Compose, T.Compose], val_fraction: float = 0.2,
                 seed: int = 0) -> tuple[Dataset, Dataset]:
    """``root/train/<class>/*`` and ``root/val/<class>/*``; or ``root/<class>/*`` split per class
    (``val_fraction`` of each class held out, fixed by ``seed``); ``transforms``: (train, val)."""
    root = Path(root)
    roots = _split_roots(root)
    if len(roots) == 2:
        train, val = _folder(roots[0], transforms[0]), _folder(roots[1], transforms[1])
        if train.classes != val.classes:
            raise ValueError(f"train and val classes differ in {root}: {train.classes} vs {val.classes}")
        return train, val
    train, val = _folder(root, transforms[0]), _folder(root, transforms[1])
    train_idx, val_idx = stratified_split(torch.tensor(train.targets), val_fraction, seed)
    return Subset(train, train_idx), Subset(val, val_idx)


def num_classes(dataset: Dataset) -> int:
    """How many classes a dataset built here has (``classes``, ``num_classes`` or its label tensor)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    if hasattr(dataset, "num_classes"):
        return int(dataset.num_classes)
    if isinstance(dataset, TensorDataset):
        return int(dataset.tensors[1].max()) + 1
    raise ValueError(f"cannot tell how many classes {type(dataset).__name__} has; pass num_classes explicitly")


def torchvision_dataset(name: str, root: str | Path, cfg: dict[str, Any], download: bool,
                        transforms: tuple[T.Compose, T.Compose]) -> tuple[Dataset, Dataset]:
    """A torchvision classification dataset by class name (``CIFAR10``, ``FakeData``, ...); ``transforms``:
    (train, val)."""
    if not hasattr(datasets, name):
        hint = did_you_mean(name, datasets.__all__, listed="torchvision.datasets.__all__")
        raise ValueError(f"torchvision.datasets has no {name!r}; {hint}")
    cls = getattr(datasets, name)
    train_transform, val_transform = transforms
    if name == "FakeData":
        size = cfg["input_size"]
        return (cls(1000, size, 10, transform=train_transform, random_offset=0),
                cls(200, size, 10, transform=val_transform, random_offset=1000))
    try:
        return (cls(root, train=True, download=download, transform=train_transform),
                cls(root, train=False, download=download, transform=val_transform))
    except RuntimeError as err:  # torchvision's "Dataset not found ... You can use download=True ..."
        if download or "download=True" not in str(err):
            raise
        raise FileNotFoundError(f"torchvision dataset {name} is not in {root}; pass --download on a machine with "
                                f"internet access (or copy it into --data-root)") from None


def add_data_arguments(parser: argparse.ArgumentParser, config: type) -> None:
    """``--data``, ``--data-root``, ``--download`` (fields of the command's ``config``), those of
    :class:`DataOptions` (read them with :func:`data_options`) and ``--check-images``: the dataset options every
    training command shares."""
    add_options(parser, config, ["data", "data_root", "download"])
    add_options(parser, DataOptions, [f.name for f in fields(DataOptions)])
    parser.add_argument("--check-images", action="store_true",
                        help="decode every image of an ImageFolder before training and list the unreadable ones")


def data_options(args: argparse.Namespace) -> DataOptions:
    """The :class:`DataOptions` of a command line built with :func:`add_data_arguments`."""
    return DataOptions(**parsed_fields(DataOptions, args))


def build_datasets(source: str, cfg: dict[str, Any], root: str | Path = "data", download: bool = False,
                   val_fraction: float = 0.2, seed: int = 0, native: bool = False,
                   options: DataOptions | None = None, expected_classes: int | None = None,
                   train_pixels: bool = False) -> tuple[Dataset, Dataset]:
    """``"digits"``, ``"torchvision:NAME"``, ``"hf:PATH_OR_NAME"``, ``"wds:PATTERN"`` (see
    :mod:`vitzoo.train.sources`; ``options`` say how those are read) or a path to an ImageFolder tree; at least two
    classes.

    ``native``: images at their own size for patch sequences (see :func:`image_transforms`); the digits, 8x8
    pixels at source, come at the model's input size either way. ``expected_classes``: the caller's count,
    for sources whose labels do not tell it (tar shards). ``train_pixels``: the training images of decoded sources
    as uint8 pixels, for :func:`vitzoo.train.fit` to normalise where it trains (``pixels`` of
    :func:`image_transforms`; the digits come normalised, and so does every validation image).
    """
    if native and train_pixels:
        raise ValueError("train_pixels ships images of one size as uint8 batches, and native keeps each image's "
                         "own size for patch sequences; pass one of them")
    transforms = (image_transforms(cfg, True, native, pixels=train_pixels), image_transforms(cfg, False, native))
    if source.startswith(PREFIXES):
        train, val = source_datasets(source, transforms, options or DataOptions(), val_fraction, seed,
                                     expected_classes)
    elif source == "digits":
        train, val = digits(cfg, val_fraction, seed)
    elif source.startswith("torchvision:"):
        train, val = torchvision_dataset(source.split(":", 1)[1], root, cfg, download, transforms)
    else:
        train, val = image_folder(source, transforms, val_fraction, seed)
    if num_classes(train) < 2:
        raise ValueError(f"{source} has only one class, so there is nothing to learn; a classifier needs at "
                         f"least two (an ImageFolder: one folder of images per class)")
    return train, val
