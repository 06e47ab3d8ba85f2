"""Position-embedding slot.

Contract: ``factory(grid_size: tuple[int, int], dim: int, num_prefix: int, *, options) -> nn.Module`` with

- ``init_table() -> nn.Parameter | None``: the learnable table the model stores as ``pos_embed``
  (timm's layout ``(1, rows, dim)``), or None for a fixed or absent embedding;
- ``forward(table, grid) -> Tensor | None``: the embedding for a patch grid ``(h, w)``, either
  ``(1, num_prefix + h * w, dim)`` (added after the prefix tokens are put in front) or ``(1, h * w, dim)``
  (added to the patch tokens only: DeiT-3, DINOv2 with registers), or None when there is nothing to add.

``num_prefix`` counts the prefix tokens (class, distillation, registers) in front of the patch tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum, rearrange, repeat
from torch import nn

from vitzoo.blocks.options import BlockOptions
from vitzoo.blocks.table import BlockTable
from vitzoo.fields import POSITIVE, described

Grid = tuple[int, int]


@dataclass(frozen=True)
class PositionOptions(BlockOptions):
    """Options of the absolute position embeddings."""

    prefix: bool = described(
        True, "the prefix tokens get positions too; False: patch tokens only (timm's no_embed_class)")


@dataclass(frozen=True)
class SinCosOptions(PositionOptions):
    """Options of the fixed sine-cosine embedding."""

    temperature: float = described(10000.0, "frequency base of the sines and cosines", POSITIVE)


def same_grid(grid: Grid, other: Grid) -> bool:
    """Whether ``grid`` is ``other``, so a table built for ``other`` serves as is. Never for a symbolic grid (an
    export with a dynamic image size): comparing it would pin the exported model to that one size."""
    return not any(isinstance(n, torch.SymInt) for n in grid) and tuple(grid) == tuple(other)


def bicubic_weights(old: int, new: int, device: torch.device | None = None) -> torch.Tensor:
    """The ``(new, old)`` matrix of antialiased bicubic resampling along one axis: PIL's cubic kernel
    (a = -0.5) on pixel centres, widened by the downscale factor, each row normalized. It equals
    ``F.interpolate(mode="bicubic", antialias=True)``, but as plain tensor ops it also exports (ONNX has no
    antialiased resize, pytorch#116306) and takes a symbolic ``new`` (a dynamic image size)."""
    scale = old / new
    centers = (torch.arange(new, dtype=torch.float32, device=device) + 0.5) * scale
    offsets = torch.arange(old, dtype=torch.float32, device=device) + 0.5 - rearrange(centers, "n -> n 1")
    # max(scale, 1): sym_max keeps an exported size symbolic; torch.jit.trace gives sizes as tensors
    stretch = scale.clamp(min=1.0) if isinstance(scale, torch.Tensor) else torch.sym_max(scale, 1.0)
    x = offsets.abs() / stretch
    a = -0.5
    weights = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                          torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))
    return weights / weights.sum(dim=-1, keepdim=True)


def resample_table(table: torch.Tensor, old_grid: Grid, new_grid: Grid, num_prefix: int) -> torch.Tensor:
    """Resize the grid part of a ``(1, num_prefix + h * w, dim)`` table; prefix rows stay as they are.

    Antialiased bicubic in float32, as timm's ``resample_abs_pos_embed`` does, so resampled tables agree
    with timm's. A symbolic grid is always resampled (:func:`same_grid`); to the same grid that is the identity.
    """
    if same_grid(new_grid, old_grid):
        return table
    prefix, grid = table[:, :num_prefix], table[:, num_prefix:]
    image = rearrange(grid, "1 (h w) d -> h w d", h=old_grid[0], w=old_grid[1]).float()
    rows, cols = (bicubic_weights(old, new, image.device) for old, new in zip(old_grid, new_grid, strict=True))
    image = einsum(rows, image, cols, "H h, h w d, W w -> H W d")
    grid = rearrange(image, "h w d -> 1 (h w) d").to(table.dtype)
    return torch.cat([prefix, grid], dim=1)


class LearnedPosition(nn.Module):
    """Learned absolute position table (ViT), resampled bicubically for other grids."""

    def __init__(
        self, grid_size: Grid, dim: int, num_prefix: int, *, options: PositionOptions = PositionOptions(),
    ) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.dim = dim
        self.num_prefix = num_prefix if options.prefix else 0

    def init_table(self) -> nn.Parameter:
        table = torch.empty(1, self.num_prefix + self.grid_size[0] * self.grid_size[1], self.dim)
        return nn.Parameter(nn.init.trunc_normal_(table, std=0.02))

    def forward(self, table: torch.Tensor | None, grid: Grid) -> torch.Tensor:
        return resample_table(table, self.grid_size, grid, self.num_prefix)


class SinCos2dPosition(nn.Module):
    """Fixed 2-D sine-cosine embedding (MAE, He et al. 2022; "Better plain ViT baselines", Beyer et
    al. 2022): a quarter of the channels each for sin/cos of the row and of the column. Prefix
    tokens get zeros. Nothing is learned or saved, so any grid works without resampling."""

    def __init__(
        self, grid_size: Grid, dim: int, num_prefix: int, *, options: SinCosOptions = SinCosOptions(),
    ) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"pos_embed='sincos2d' needs embed_dim divisible by 4, got {dim}")
        self.grid_size = tuple(grid_size)
        self.dim = dim
        self.num_prefix = num_prefix if options.prefix else 0
        self.temperature = options.temperature
        self.register_buffer("default", self._build(self.grid_size, None), persistent=False)

    def _build(self, grid: Grid, device: torch.device | None) -> torch.Tensor:
        h, w = grid
        omega = self.temperature ** -torch.linspace(0, 1, self.dim // 4, device=device)
        rows = torch.einsum("h,f->hf", torch.arange(h, dtype=torch.float32, device=device), omega)
        cols = torch.einsum("w,f->wf", torch.arange(w, dtype=torch.float32, device=device), omega)
        emb = torch.cat([
            repeat(rows.sin(), "h f -> h w f", w=w),
            repeat(rows.cos(), "h f -> h w f", w=w),
            repeat(cols.sin(), "w f -> h w f", h=h),
            repeat(cols.cos(), "w f -> h w f", h=h),
        ], dim=-1)
        prefix = torch.zeros(self.num_prefix, self.dim, device=device)
        return rearrange(torch.cat([prefix, rearrange(emb, "h w d -> (h w) d")]), "n d -> 1 n d")

    def init_table(self) -> None:
        return None

    def forward(self, table: torch.Tensor | None, grid: Grid) -> torch.Tensor:
        if same_grid(grid, self.grid_size):
            return self.default
        return self._build(grid, self.default.device)


class NoPosition(nn.Module):
    """No position information; attention alone must infer the layout (an ablation baseline)."""

    def __init__(self, grid_size: Grid, dim: int, num_prefix: int) -> None:
        super().__init__()

    def init_table(self) -> None:
        return None

    def forward(self, table: torch.Tensor | None, grid: Grid) -> None:
        return None


def _position_probe(module: nn.Module, args: tuple) -> tuple[torch.Tensor | None, tuple[int, ...]]:
    """``forward(init_table(), grid_size)`` must be a ``(1, num_prefix + h * w, dim)`` or ``(1, h * w, dim)``
    table, or None."""
    grid_size, dim, num_prefix = args
    patches = grid_size[0] * grid_size[1]
    out = module(module.init_table(), tuple(grid_size))
    if out is None:  # nothing to add, allowed
        return torch.empty(1, patches, dim), (1, patches, dim)
    return out, (1, patches if out.shape[1] == patches else num_prefix + patches, dim)


POSITIONS: BlockTable = BlockTable(
    "pos_embed", "factory(grid_size, dim, num_prefix, *, options) -> module with init_table() and "
    "forward(table, grid) -> (1, [num_prefix +] h * w, dim) or None", probe=_position_probe,
)
POSITIONS.register("learned", LearnedPosition, options=PositionOptions)
POSITIONS.register("sincos2d", SinCos2dPosition, options=SinCosOptions)
POSITIONS.register("none", NoPosition)
POSITIONS.alias("sincos", "sincos2d")
