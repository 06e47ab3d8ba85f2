"""``--data hf:PATH_OR_NAME``: a Hugging Face ``datasets`` image-classification set, read by index.

``PATH`` is a folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``) or a folder of parquet /
arrow files (``datasets`` infers the splits from the file names, e.g. ``train-*.parquet``, ``test-*.parquet``);
anything else is a hub name, loaded through ``datasets`` (which needs the network only until it is cached). The
image column is the one ``Image`` feature and the label column the one ``ClassLabel`` feature (its names are the
class names) unless the options name them. Arrow tables are memory-mapped, so random access is cheap; streaming
(``IterableDataset``) is not offered, because exact resume reads the samples of an epoch by index.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

if TYPE_CHECKING:
    from vitzoo.train.sources import DataOptions

VAL_SPLITS = ("validation", "val", "valid", "test")
LABEL_NAMES = ("label", "labels")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError("--data hf:... reads Hugging Face datasets: pip install datasets "
                          "(or pip install 'vitzoo[data]')") from None
    return datasets


def load(where: str) -> Any:
    """A ``Dataset`` or ``DatasetDict``: from ``save_to_disk``'s folder, a folder of data files, or the hub."""
    datasets = _datasets()
    path = Path(where)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    if path.is_dir():
        if not any(p.is_file() for p in path.rglob("*")):
            raise ValueError(f"--data hf:{where} is an empty folder; save a dataset there with save_to_disk or put "
                             f"its parquet/arrow files there")
        return datasets.load_dataset(str(path))
    if path.suffix in (".parquet", ".arrow") or where.startswith((".", "/")):
        raise FileNotFoundError(f"--data hf:{where} does not exist; give a save_to_disk folder, a folder of "
                                f"parquet/arrow files or a hub name")
    try:
        return datasets.load_dataset(where)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise FileNotFoundError(f"--data hf:{where} is no local folder and the hub dataset could not be loaded "
                                f"({type(err).__name__}: {err}); on a machine without internet, load it once "
                                f"where there is, or save_to_disk it and pass that folder") from None


def _split(data: Any, name: str, where: str, what: str) -> Any:
    if name not in data:
        raise ValueError(f"hf:{where} has no split {name!r} for {what}; its splits: {', '.join(data)}")
    return data[name]


def _column(table: Any, given: str | None, kind: type, names: tuple[str, ...], option: str, where: str) -> str:
    """The column ``given``, else the one of feature type ``kind``, else one named like ``names``."""
    features = table.features
    listed = ", ".join(f"{k} ({type(v).__name__})" for k, v in features.items())
    if given is not None:
        if given not in features:
            raise ValueError(f"hf:{where} has no column {given!r} ({option}); its columns: {listed}")
        return given
    typed = [k for k, v in features.items() if isinstance(v, kind)]
    if len(typed) == 1:
        return typed[0]
    named = [k for k in names if k in features]
    if not typed and named:
        return named[0]
    found = f"{len(typed)} {kind.__name__} columns" if typed else f"no {kind.__name__} column"
    raise ValueError(f"hf:{where} has {found}, so the {option.removeprefix('--').replace('-', ' ')} cannot be "
                     f"chosen; pass {option} (its columns: {listed})")


class HFReader:
    """Images and labels of one split; the image column is decoded by ``datasets`` as a PIL image."""

    def __init__(self, table: Any, where: str, options: DataOptions) -> None:
        datasets = _datasets()
        image = _column(table, options.image_column, datasets.Image, ("image", "img"), "--image-column", where)
        label = _column(table, options.label_column, datasets.ClassLabel, LABEL_NAMES, "--label-column", where)
        table = table.select_columns([image, label])
        if not isinstance(table.features[image], datasets.Image):  # paths or encoded bytes: let datasets decode them
            table = table.cast_column(image, datasets.Image())
        self.table, self.column = table, image
        self.labels = torch.tensor(table.data.column(label).to_pylist(), dtype=torch.long)
        feature = table.features[label]
        if hasattr(feature, "names"):
            self.classes = list(feature.names)
        elif len(self.labels) and self.labels.min() >= 0:
            self.classes = [str(i) for i in range(int(self.labels.max()) + 1)]
        else:
            raise ValueError(f"hf:{where}: the label column {label!r} holds no class indices (0, 1, ...); pass "
                             f"--label-column naming one that does")

    def image(self, index: int) -> Image.Image:
        return self.table[index][self.column].convert("RGB")


def hf_readers(where: str, options: DataOptions) -> tuple[HFReader, HFReader | None]:
    """(train, val) readers; val is None where the dataset has no validation split (then a share is held out)."""
    data = load(where)
    if not hasattr(data, "keys"):  # a single Dataset: the training data, nothing held out yet
        if options.hf_val_split:
            raise ValueError(f"hf:{where} is one dataset without splits; drop --hf-val-split "
                             f"{options.hf_val_split} (val_fraction of each class is held out)")
        return HFReader(data, where, options), None
    train = _split(data, options.hf_split, where, "training (--hf-split)")
    val_name = options.hf_val_split or next((s for s in VAL_SPLITS if s in data and s != options.hf_split), None)
    val = _split(data, val_name, where, "validation (--hf-val-split)") if val_name else None
    return HFReader(train, where, options), HFReader(val, where, options) if val is not None else None
