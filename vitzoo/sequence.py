"""How a model reads a patch-sequence batch (:mod:`vitzoo.packing`): where each image's tokens are, its patch
grid, which tokens may attend to which, and its tokens gathered back per image for pooling.

A row of ``L`` patches holding ``k`` images becomes ``k * num_prefix + L`` tokens: each image's prefix tokens
(class, distillation, registers) in front, in image order, then the patches as given. Grid-dependent tables
(positions, rotary angles) are built once per distinct image grid by the model's own blocks and gathered per
token, so a packed image gets exactly what it gets alone at its size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange, repeat

from vitzoo.blocks.patch import autocast_casts
from vitzoo.packing import SEQUENCE_KEYS

Grid = tuple[int, int]


def checked_sequence(
    batch: Any, weight: torch.Tensor, in_chans: int, patch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(patches, patch_coord, patch_valid, patch_image)`` of a patch-sequence dict, refused with what to do when
    a key is missing or a shape or dtype does not fit this model."""
    missing = [key for key in SEQUENCE_KEYS if key not in batch]
    if missing:
        raise KeyError(f"a patch-sequence batch needs the keys {list(SEQUENCE_KEYS)} (patch_image optional); "
                       f"missing {missing}; build it with vitzoo.packing.pack_images")
    patches, coord, valid, image = (batch.get(k) for k in (*SEQUENCE_KEYS, "patch_image"))
    dim = patch_size * patch_size * in_chans
    if patches.ndim != 3 or patches.shape[-1] != dim:
        raise ValueError(f"patches must be (B, L, {dim}) for patch_size={patch_size} and in_chans={in_chans} "
                         f"(each patch flattened as (p, p, c)), got {tuple(patches.shape)}")
    rows, length = patches.shape[:2]
    for key, tensor, shape in (("patch_coord", coord, (rows, length, 2)), ("patch_valid", valid, (rows, length)),
                               ("patch_image", image, (rows, length))):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{key} must be {shape} to match patches {tuple(patches.shape)}, "
                             f"got {tuple(tensor.shape)}")
    if patches.dtype != weight.dtype and not autocast_casts(patches):
        raise TypeError(f"this model's weights are {weight.dtype}, got {patches.dtype} patches; convert them with "
                        f"x.to({weight.dtype}) or run under torch.autocast")
    if coord.is_floating_point() or (image is not None and image.is_floating_point()):
        raise TypeError("patch_coord and patch_image hold integer indices; pass them as torch.long")
    return patches, coord.long(), valid.bool(), None if image is None else image.long()


@dataclass(frozen=True)
class SequenceLayout:
    """The token layout of a patch-sequence batch for a model with ``num_prefix`` prefix tokens."""

    num_prefix: int
    per_row: int  # images per row (slots): the most any row holds
    owner: torch.Tensor  # (B, N) image of each token, b * per_row + index; -1 on padding and unused slots
    cell: torch.Tensor  # (B, N) a patch token's row-major place y * w + x in its grid; a prefix token's slot t
    is_patch: torch.Tensor  # (B, N) bool
    grids: torch.Tensor  # (B * per_row, 2) each image's patch grid (0, 0 where the slot is unused)
    present: torch.Tensor  # (B * per_row,) bool: the slot holds an image

    @classmethod
    def of(
        cls, coord: torch.Tensor, valid: torch.Tensor, image: torch.Tensor | None, num_prefix: int,
    ) -> SequenceLayout:
        rows, length = valid.shape
        index = torch.zeros_like(valid, dtype=torch.long) if image is None else image.clamp(min=0)
        per_row = int(index[valid].max()) + 1 if image is not None and valid.any() else 1
        slot = torch.arange(rows, device=valid.device)[:, None] * per_row + index
        patch_owner = torch.where(valid, slot, -1)
        grids = coord.new_zeros(rows * per_row, 2)
        for axis in range(2):  # each image's grid side: its largest coordinate + 1
            grids[:, axis].scatter_reduce_(0, slot[valid], coord[..., axis][valid] + 1, "amax")
        present = grids[:, 0] > 0
        prefix_owner = rearrange(torch.arange(rows * per_row, device=valid.device), "(b k) -> b k", k=per_row)
        prefix_owner = torch.where(rearrange(present, "(b k) -> b k", k=per_row), prefix_owner, -1)
        width = grids[slot, 1]
        patch_cell = coord[..., 0] * width + coord[..., 1]
        prefix_cell = repeat(torch.arange(num_prefix, device=valid.device), "t -> b (k t)", b=rows, k=per_row)
        return cls(
            num_prefix=num_prefix, per_row=per_row,
            owner=torch.cat([repeat(prefix_owner, "b k -> b (k t)", t=num_prefix), patch_owner], dim=1),
            cell=torch.cat([prefix_cell, patch_cell], dim=1),
            is_patch=torch.cat([torch.zeros_like(prefix_cell, dtype=torch.bool), valid], dim=1),
            grids=grids, present=present,
        )

    @property
    def prefix_length(self) -> int:
        """Tokens in front of the patches in each row."""
        return self.per_row * self.num_prefix

    def mask(self) -> torch.Tensor:
        """Which keys each query may attend to, ``(B, 1, N, N)``: the tokens of its own image. Padding attends to
        padding only (a query with no key at all would make NaNs that reach the real tokens through padding)."""
        return rearrange(self.owner, "b n -> b 1 n 1") == rearrange(self.owner, "b n -> b 1 1 n")

    def distinct_grids(self) -> list[Grid]:
        return [tuple(g) for g in torch.unique(self.grids[self.present], dim=0).tolist()]

    def per_token(
        self, table: Callable[[Grid], torch.Tensor | None], fill: float, prefix_rows: bool,
    ) -> torch.Tensor | None:
        """A grid-dependent table gathered per token: ``table(grid)`` is ``(..., rows, d)`` with ``rows`` the
        grid's cells row-major, after ``num_prefix`` prefix rows when ``prefix_rows``. Returns ``(..., B, N, d)``;
        tokens without a row of their own (padding, prefix tokens of a table without prefix rows) get ``fill``.
        None when ``table`` gives None (nothing to add)."""
        out = None
        image_grid = self.grids[self.owner.clamp(min=0)]  # (B, N, 2)
        for grid in self.distinct_grids():
            values = table(grid)
            if values is None:
                return None
            offset = self.num_prefix if prefix_rows else 0
            row = torch.where(self.is_patch, self.cell + offset, self.cell).clamp(max=values.shape[-2] - 1)
            mine = (self.owner >= 0) & (image_grid == image_grid.new_tensor(grid)).all(-1)
            if not prefix_rows:
                mine = mine & self.is_patch
            gathered = values[..., row, :]  # (..., B, N, d)
            if out is None:
                out = torch.full_like(gathered, fill)
            out = torch.where(rearrange(mine, "b n -> b n 1"), gathered, out)
        return out

    def images(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(B, N, d)`` -> each image's tokens ``(images, num_prefix + P, d)`` (prefix first, then its
        patches in their order, padded to the longest image's ``P``) and which are real ``(images, num_prefix +
        P)``; images row by row, in a row by index."""
        if self.per_row == 1:  # one image per row: the layout is already per image
            keep = self.present
            return x[keep], torch.where(self.is_patch, True, self.owner >= 0)[keep]
        number = torch.cumsum(self.present, 0) - 1  # slot -> image number
        owner = self.owner.flatten()
        is_patch = self.is_patch.flatten()
        real = owner >= 0
        key = torch.where(real, owner * 2 + is_patch, owner.new_tensor(2 * len(self.present)))
        order = torch.sort(key, stable=True).indices  # grouped by image, prefix before patches, order kept
        owner_sorted, real_sorted = owner[order], real[order]
        first = torch.zeros(len(self.present) + 1, dtype=torch.long, device=x.device)
        first[1:] = torch.cumsum(torch.bincount(owner[real], minlength=len(self.present)), 0)
        place = torch.arange(len(order), device=x.device) - first[owner_sorted.clamp(min=0)]
        count = int(self.present.sum())
        longest = int((first[1:] - first[:-1]).max()) if count else 0
        out = x.new_zeros(count, longest, x.shape[-1])
        keep = torch.zeros(count, longest, dtype=torch.bool, device=x.device)
        images = number[owner_sorted[real_sorted]]
        out[images, place[real_sorted]] = rearrange(x, "b n d -> (b n) d")[order[real_sorted]]
        keep[images, place[real_sorted]] = True
        return out, keep
