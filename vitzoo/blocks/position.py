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
from typing import Literal

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import nn

from vitzoo.blocks.options import BlockOptions
from vitzoo.blocks.table import BlockTable
from vitzoo.fields import AT_LEAST_ONE, POSITIVE, described

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


@dataclass(frozen=True)
class LearnedOptions(PositionOptions):
    """Options of the learned table."""

    resample: Literal["bicubic", "bilinear_corners"] = described(
        "bicubic", "how the table is resized for another grid: bicubic (antialiased, timm's resample_abs_pos_embed) "
                   "| bilinear_corners (bilinear with align_corners, as Qwen3-VL resizes its table)")
    table_grid: tuple[int, int] | None = described(
        None, "(h, w) of the stored table, whatever the image size, resized to each image's grid in forward; None: "
              "img_size / patch_size, resized once when weights of another grid load (Qwen3-VL: 48 x 48)",
        AT_LEAST_ONE)


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


def resample_table(table: torch.Tensor, old_grid: Grid, new_grid: Grid, num_prefix: int,
                   bilinear_corners: bool = False) -> torch.Tensor:
    """Resize the grid part of a ``(1, num_prefix + h * w, dim)`` table; prefix rows stay as they are.

    Antialiased bicubic in float32, as timm's ``resample_abs_pos_embed`` does, so resampled tables agree
    with timm's; ``bilinear_corners``: bilinear with align_corners instead, as Qwen3-VL resizes its table. A
    symbolic grid is always resampled (:func:`same_grid`); to the same grid that is the identity.
    """
    if same_grid(new_grid, old_grid):
        return table
    prefix, grid = table[:, :num_prefix], table[:, num_prefix:]
    if bilinear_corners:
        image = rearrange(grid, "1 (h w) d -> 1 d h w", h=old_grid[0], w=old_grid[1]).float()
        image = F.interpolate(image, size=tuple(new_grid), mode="bilinear", align_corners=True)
        grid = rearrange(image, "1 d h w -> 1 (h w) d").to(table.dtype)
    else:
        image = rearrange(grid, "1 (h w) d -> h w d", h=old_grid[0], w=old_grid[1]).float()
        rows, cols = (bicubic_weights(old, new, image.device) for old, new in zip(old_grid, new_grid, strict=True))
        image = einsum(rows, image, cols, "H h, h w d, W w -> H W d")
        grid = rearrange(image, "h w d -> 1 (h w) d").to(table.dtype)
    return torch.cat([prefix, grid], dim=1)


class LearnedPosition(nn.Module):
    """Learned absolute position table (ViT), resampled for other grids (bicubically unless ``resample`` says)."""

    def __init__(
        self, grid_size: Grid, dim: int, num_prefix: int, *, options: LearnedOptions = LearnedOptions(),
    ) -> None:
        super().__init__()
        self.grid_size = tuple(options.table_grid or grid_size)  # the stored table's
        self.dim = dim
        self.num_prefix = num_prefix if options.prefix else 0
        self.bilinear = options.resample == "bilinear_corners"

    def init_table(self) -> nn.Parameter:
        table = torch.empty(1, self.num_prefix + self.grid_size[0] * self.grid_size[1], self.dim)
        return nn.Parameter(nn.init.trunc_normal_(table, std=0.02))

    def forward(self, table: torch.Tensor | None, grid: Grid) -> torch.Tensor:
        return resample_table(table, self.grid_size, grid, self.num_prefix, self.bilinear)

    def fitted(self, table: torch.Tensor, old_grid: Grid) -> torch.Tensor:
        """A checkpoint's table of ``old_grid`` resized to this table's grid, the way forward resizes it."""
        return resample_table(table, old_grid, self.grid_size, self.num_prefix, self.bilinear)


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


RESAMPLING_MODES = ("bicubic", "bilinear")


def resize_target(grid: Grid, keep_aspect: bool) -> Grid:
    """The size a table is resized to for ``grid``: the grid itself, or with ``keep_aspect`` a square of its
    longer side whose top-left ``h x w`` is then kept (timm's ``pos_embed_ar_preserving``)."""
    return (max(grid),) * 2 if keep_aspect else tuple(grid)


@dataclass(frozen=True)
class GridTableOptions(BlockOptions):
    """Options of the position tables stored as a grid, resized per image grid (NaFlexViT, C-RADIO)."""

    table_grid: tuple[int, int] | None = described(
        None, "(h, w) of the stored table; None: img_size / patch_size (NaFlexViT: 16 x 16, C-RADIO: 128 x 128)",
        AT_LEAST_ONE)
    mode: str = described("bicubic", "resizing: bicubic | bilinear (SigLIP 2, C-RADIO)")
    keep_aspect: bool = described(
        False, "resize to a square of the grid's longer side and keep its top-left h x w, so the table is never "
               "stretched (timm's pos_embed_ar_preserving)")
    antialias: bool = described(True, "antialias when shrinking the table")
    align_corners: bool = described(False, "align_corners of the resizing (C-RADIOv3 B and H: true)")
    grid_sample: bool = described(
        False, "sample the table at each patch's centre (F.grid_sample) instead of resizing it: the same positions "
               "without a table the size of the grid (timm's pos_embed_use_grid_sample, for sequences and images "
               "alike here)")

    def check(self, spec) -> None:
        if self.mode not in RESAMPLING_MODES:
            raise ValueError(f"mode={self.mode!r}; valid: {', '.join(RESAMPLING_MODES)}")


class GridTablePosition(nn.Module):
    """A learned ``(1, h, w, dim)`` table of the patch tokens only, resized to each image's grid as NaFlexViT does
    (NaViT, Dehghani et al. 2023; FlexiViT, Beyer et al. 2023; timm's ``NaFlexEmbeds``): with ``F.interpolate``
    in float32, optionally to a square of the longer side cropped top-left, or sampled at each patch's centre."""

    def __init__(
        self, grid_size: Grid, dim: int, num_prefix: int, *, options: GridTableOptions = GridTableOptions(),
    ) -> None:
        super().__init__()
        self.table_grid = tuple(options.table_grid or grid_size)
        self.dim, self.options = dim, options

    def init_table(self) -> nn.Parameter:
        return nn.Parameter(nn.init.trunc_normal_(torch.empty(1, *self.table_grid, self.dim), std=0.02))

    def forward(self, table: torch.Tensor, grid: Grid) -> torch.Tensor:
        h, w = grid
        opts = self.options
        image = rearrange(table, "1 h w d -> 1 d h w").float()
        if opts.grid_sample:
            rows, cols = resize_target(grid, opts.keep_aspect)
            ys, xs = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=table.device) for n in grid),
                                    indexing="ij")
            if opts.align_corners:
                points = [2 * xs / max(cols - 1, 1) - 1, 2 * ys / max(rows - 1, 1) - 1]
            else:
                points = [(2 * xs + 1) / cols - 1, (2 * ys + 1) / rows - 1]
            where = rearrange(torch.stack(points, dim=-1), "h w two -> 1 (h w) 1 two")
            image = F.grid_sample(image, where, mode=opts.mode, align_corners=opts.align_corners,
                                  padding_mode="border")
            return rearrange(image, "1 d n 1 -> 1 n d").to(table.dtype)
        if not same_grid(grid, self.table_grid):
            image = F.interpolate(image, size=resize_target(grid, opts.keep_aspect), mode=opts.mode,
                                  align_corners=opts.align_corners, antialias=opts.antialias)[..., :h, :w]
        return rearrange(image, "1 d h w -> 1 (h w) d").to(table.dtype)


@dataclass(frozen=True)
class FactorizedOptions(BlockOptions):
    """Options of the factorized position tables."""

    table_grid: tuple[int, int] | None = described(
        None, "(h, w): rows of the y and x tables; None: img_size / patch_size (NaFlexViT: 16 x 16)", AT_LEAST_ONE)
    keep_aspect: bool = described(
        False, "resize both tables to the grid's longer side and keep the first h and w rows (timm's "
               "pos_embed_ar_preserving)")


class FactorizedPosition(nn.Module):
    """A learned row table and column table, resized linearly per image grid and added: ``pos[y, x] = row[y] +
    col[x]``, far fewer parameters than a grid table (NaViT's factorized embedding, Dehghani et al. 2023; timm's
    NaFlexViT ``pos_embed='factorized'``). The tables are this module's own: ``pos_embed_y`` and ``pos_embed_x``."""

    def __init__(
        self, grid_size: Grid, dim: int, num_prefix: int, *, options: FactorizedOptions = FactorizedOptions(),
    ) -> None:
        super().__init__()
        rows, cols = options.table_grid or grid_size
        self.pos_embed_y = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, rows, dim), std=0.02))
        self.pos_embed_x = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, cols, dim), std=0.02))
        self.keep_aspect = options.keep_aspect

    def init_table(self) -> None:
        return None

    @staticmethod
    def _resize(table: torch.Tensor, length: int) -> torch.Tensor:
        if length == table.shape[1]:
            return table
        line = F.interpolate(rearrange(table, "1 n d -> 1 d n").float(), size=length, mode="linear",
                             align_corners=False)
        return rearrange(line, "1 d n -> 1 n d").to(table.dtype)

    def forward(self, table: None, grid: Grid) -> torch.Tensor:
        h, w = grid
        rows, cols = resize_target(grid, self.keep_aspect)
        y, x = self._resize(self.pos_embed_y, rows)[0, :h], self._resize(self.pos_embed_x, cols)[0, :w]
        return rearrange(rearrange(y, "h d -> h 1 d") + rearrange(x, "w d -> 1 w d"), "h w d -> 1 (h w) d")


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
POSITIONS.register("learned", LearnedPosition, options=LearnedOptions)
POSITIONS.register("sincos2d", SinCos2dPosition, options=SinCosOptions)
POSITIONS.register("none", NoPosition)
POSITIONS.register("grid_table", GridTablePosition, options=GridTableOptions)
POSITIONS.register("factorized", FactorizedPosition, options=FactorizedOptions)
POSITIONS.alias("sincos", "sincos2d")
