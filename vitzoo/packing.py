"""Patch sequences: images at their own size and aspect ratio, cut into patches and packed into rows.

Every vitzoo model takes, besides image batches, a *patch sequence*: the dict timm's NaFlex collator makes,

- ``patches``: ``(B, L, p * p * c)`` float, each patch flattened in ``(p, p, c)`` order (timm's NaFlex layout);
- ``patch_coord``: ``(B, L, 2)`` long, each patch's (row, column) in its own image's patch grid;
- ``patch_valid``: ``(B, L)`` bool, False on padding;

and one key of vitzoo's (NaViT's packing, Dehghani et al. 2023), optional:

- ``patch_image``: ``(B, L)`` long, which image of its row a patch belongs to (0, 1, ...).

Without ``patch_image`` each row is one image, as in timm. With it, several images share a row and attention
is masked so that they do not see each other. The model returns one output per image, row by row, and in a
row by ``patch_image``. :func:`pack_images` makes such a batch from images of any sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange

SEQUENCE_KEYS = ("patches", "patch_coord", "patch_valid")


def image_patches(image: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(c, H, W)`` image (sides multiples of ``patch_size``) -> its patches ``(h * w, p * p * c)`` row by row,
    and their (row, column) ``(h * w, 2)``."""
    c, height, width = image.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size={patch_size}; resize it "
                         f"with vitzoo.packing.budget_size first")
    h, w = height // patch_size, width // patch_size
    patches = rearrange(image, "c (h p1) (w p2) -> (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return patches, rearrange(torch.stack([rows, cols]), "two h w -> (h w) two")


def budget_size(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """The largest size with ``height``'s and ``width``'s aspect ratio (as near as whole patches allow) whose patch
    grid has at most ``max_patches`` patches: NaFlex's aspect-preserving resize. Each side gets at least one patch."""
    if max_patches < 1:
        raise ValueError(f"max_patches must be at least 1, got {max_patches}")
    scale = math.sqrt(max_patches * patch_size**2 / (height * width))
    h, w = max(1, int(height * scale / patch_size)), max(1, int(width * scale / patch_size))
    while h * w > max_patches:  # flooring keeps h * w within the budget except where a side was raised to 1
        h, w = (h - 1, w) if h >= w else (h, w - 1)
    return h * patch_size, w * patch_size


@dataclass(frozen=True)
class Placement:
    """Where one image went in a packed batch: its row, its index in the row, and its first token there."""

    row: int
    index: int
    start: int
    length: int


def pack_images(
    images: Sequence[torch.Tensor], patch_size: int, seq_len: int | None = None, rows: int | None = None,
) -> tuple[dict[str, torch.Tensor], list[Placement]]:
    """Pack ``images`` (each ``(c, H, W)``, any sides that are multiples of ``patch_size``) into rows of
    ``seq_len`` patches, first fit in the given order; returns the batch dict and each image's
    :class:`Placement`. ``seq_len`` None: one image per row, padded to the longest (timm's NaFlex batch, no
    ``patch_image``). ``rows`` pads the batch to that many rows (so steps have one shape). The model's outputs
    come in the order of the placements sorted by (row, index), which :func:`output_order` gives.
    """
    cut = [image_patches(image, patch_size) for image in images]
    if seq_len is None:
        seq_len = max(len(p) for p, _ in cut)
        placements = [Placement(i, 0, 0, len(p)) for i, (p, _) in enumerate(cut)]
    else:
        placements = _first_fit([len(p) for p, _ in cut], seq_len)
    n_rows = max((p.row for p in placements), default=-1) + 1
    if rows is not None:
        if rows < n_rows:
            raise ValueError(f"these images need {n_rows} rows of {seq_len} patches; rows={rows} is too few")
        n_rows = rows
    dim = cut[0][0].shape[1] if cut else patch_size * patch_size * 3
    dtype = cut[0][0].dtype if cut else torch.float32
    batch = {
        "patches": torch.zeros(n_rows, seq_len, dim, dtype=dtype),
        "patch_coord": torch.zeros(n_rows, seq_len, 2, dtype=torch.long),
        "patch_valid": torch.zeros(n_rows, seq_len, dtype=torch.bool),
        "patch_image": torch.zeros(n_rows, seq_len, dtype=torch.long),
    }
    for (patches, coords), place in zip(cut, placements, strict=True):
        span = slice(place.start, place.start + place.length)
        batch["patches"][place.row, span] = patches
        batch["patch_coord"][place.row, span] = coords
        batch["patch_valid"][place.row, span] = True
        batch["patch_image"][place.row, span] = place.index
    if all(p.index == 0 for p in placements):
        del batch["patch_image"]  # one image per row: timm's batch
    return batch, placements


def _first_fit(lengths: Sequence[int], seq_len: int) -> list[Placement]:
    """Each length into the first row with room for it, a new row when none has."""
    used: list[int] = []
    count: list[int] = []
    placements = []
    for i, length in enumerate(lengths):
        if length > seq_len:
            raise ValueError(f"image {i} has {length} patches, more than seq_len={seq_len}; resize it to fit "
                             f"(vitzoo.packing.budget_size) or raise seq_len")
        row = next((r for r, u in enumerate(used) if u + length <= seq_len), len(used))
        if row == len(used):
            used.append(0)
            count.append(0)
        placements.append(Placement(row, count[row], used[row], length))
        used[row] += length
        count[row] += 1
    return placements


def output_order(placements: Sequence[Placement]) -> list[int]:
    """The input index of each output of a model run on a packed batch: outputs come row by row, then by index."""
    return sorted(range(len(placements)), key=lambda i: (placements[i].row, placements[i].index))


def is_sequence(x: object) -> bool:
    """Whether ``x`` is a patch-sequence batch (a dict with timm's NaFlex keys) rather than images."""
    return isinstance(x, dict)
