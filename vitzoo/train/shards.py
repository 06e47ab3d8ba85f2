"""``--data wds:PATTERN``: webdataset tar shards (timm's and open_clip's layout), read by index.

A shard is an uncompressed tar whose members are grouped into samples by key, the member name up to the first
dot of its file name: ``000123.jpg`` (or ``.jpeg``, ``.png``, ``.webp``) holds the image and ``000123.cls`` the
class index as text. ``PATTERN`` expands braces as webdataset does (``train-{000000..000003}.tar``,
``{a,b}.tar``) and globs (``shards/*.tar``). Instead of streaming the shards, their headers are indexed once
(where each image lies, and each label) and an image is read with one seek: samples come by index, so the
resumable sampler and the per-sample augmentation seeds apply unchanged, and a resume is exact.
"""

from __future__ import annotations

import io
import re
from glob import glob
from pathlib import Path

import torch
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "cls"
_BRACE = re.compile(r"\{([^{}]*)\}")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's split of a member name into key and extension


def expand(pattern: str) -> list[str]:
    """The names ``pattern`` stands for: ``{000..002}`` is a zero-padded range, ``{a,b}`` alternatives (the first
    brace is expanded, then the rest, in order)."""
    found = _BRACE.search(pattern)
    if not found:
        return [pattern]
    head, tail, body = pattern[: found.start()], pattern[found.end():], found.group(1)
    ends = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if ends:
        first, last = ends.groups()
        choices = [f"{i:0{len(first)}d}" for i in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [name for choice in choices for name in expand(head + choice + tail)]


def shard_paths(pattern: str) -> list[Path]:
    """The shard files of ``pattern``, in pattern order (globs sorted); every one must exist."""
    names = [hit for name in expand(pattern) for hit in (sorted(glob(name)) if glob_magic(name) else [name])]
    if not names:
        raise FileNotFoundError(f"wds:{pattern} matches no files; give tar shards, e.g. "
                                f"wds:shards/train-{{000000..000003}}.tar")
    missing = [name for name in names if not Path(name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"wds:{pattern}: {len(missing)} of {len(names)} shards do not exist: {shown}")
    return [Path(name) for name in names]


def glob_magic(name: str) -> bool:
    return any(c in name for c in "*?[")


def _index(path: Path) -> list[tuple[str, int, int, int]]:
    """(key, image offset, image size, label) for each sample of one shard, in shard order."""
    with path.open("rb") as f:
        if f.read(2) in (b"\x1f\x8b", b"BZ", b"\xfd7", b"(\xb5"):
            raise ValueError(f"{path} is compressed; shards are read at random offsets, so they must be plain tar "
                             f"files: decompress it (e.g. gunzip)")
    import tarfile

    samples: dict[str, dict[str, tuple[int, int] | int]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                parts = _KEY.match(member.name) if member.isfile() else None
                if parts is None:
                    continue
                key, extension = parts.group(1), parts.group(2).lower()
                if extension == LABEL_EXTENSION:
                    text = tar.extractfile(member).read().decode().strip()
                    if not text.isdigit():
                        raise ValueError(f"{path}: {member.name} holds {text[:40]!r}, not a class index (0, 1, ...)")
                    samples.setdefault(key, {})["label"] = int(text)
                elif extension in IMAGE_EXTENSIONS:
                    samples.setdefault(key, {})["image"] = (member.offset_data, member.size)
                else:
                    samples.setdefault(key, {})
    except tarfile.TarError as err:
        raise ValueError(f"{path} is not a readable tar file ({err}); a shard is a plain tar of samples") from None
    rows = []
    for key, parts in samples.items():
        if "image" not in parts or "label" not in parts:
            lacking = f"image member ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})" if "image" not in parts \
                else f"label member (.{LABEL_EXTENSION}: the class index as text)"
            raise ValueError(f"{path}: sample {key!r} has no {lacking}; every sample needs "
                             f"{key}.jpg (or .png, ...) and {key}.{LABEL_EXTENSION}")
        rows.append((key, *parts["image"], parts["label"]))
    return rows


class ShardReader:
    """Every sample of some shards: where its image lies (shard, offset, size) and its label."""

    def __init__(self, paths: list[Path], num_classes: int | None = None) -> None:
        rows = [(shard, *row[1:]) for shard, path in enumerate(paths) for row in _index(path)]
        if not rows:
            raise ValueError(f"the shards {paths[0]}{' ...' if len(paths) > 1 else ''} hold no samples")
        self.paths = [str(p) for p in paths]
        shard, offset, size, labels = zip(*rows, strict=True)
        self.where = torch.tensor([shard, offset, size], dtype=torch.long)  # one tensor: cheap to pickle to workers
        self.labels = torch.tensor(labels, dtype=torch.long)
        largest = int(self.labels.max()) + 1
        if num_classes is not None and num_classes < largest:
            raise ValueError(f"the labels of {self.paths[0]}... go up to {largest - 1}, so there are at least "
                             f"{largest} classes, not num_classes={num_classes}")
        self.classes = [str(i) for i in range(max(largest, num_classes or 0))]

    def image(self, index: int) -> Image.Image:
        shard, offset, size = self.where[:, index].tolist()
        with open(self.paths[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"cannot read sample {index} of {self.paths[shard]} ({type(err).__name__}: {err}); "
                             f"rewrite that shard") from None


def shard_reader(pattern: str, num_classes: int | None = None) -> ShardReader:
    """The samples of the shards ``pattern`` names (see :func:`expand`)."""
    if not pattern.strip():
        raise ValueError("wds: needs a shard pattern, e.g. wds:shards/train-{000000..000003}.tar")
    return ShardReader(shard_paths(pattern), num_classes)
