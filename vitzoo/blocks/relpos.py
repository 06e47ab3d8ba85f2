"""Attention with a learned relative-position bias: each head adds a bias that depends on the offset between the
query's and the key's patch to its logits (Shaw et al. 2018; Swin, Liu et al. 2021; BEiT, Bao et al. 2022).

The bias is laid out for one patch grid, the model's at its ``img_size`` (the options are :class:`GridOptions`),
and goes into ``F.scaled_dot_product_attention`` as an additive float ``attn_mask``. Entries of the ``attn`` slot:

- ``relpos_bias``: a table of one row per offset, ``attn.rel_pos.relative_position_bias_table`` (timm's
  ``RelPosBias``); with prefix tokens three more rows: prefix to patch, patch to prefix, prefix to prefix.
- ``relpos_mlp``: a small MLP over log-spaced offsets, ``attn.rel_pos.mlp.fc1/fc2`` (Swin V2, Liu et al. 2022;
  timm's ``RelPosMlp``); prefix tokens get no bias.
- ``beit``: the table of ``relpos_bias`` stored on the attention itself, ``attn.relative_position_bias_table``,
  with BEiT's q/v biases (``q_bias``, ``v_bias``; :class:`~vitzoo.blocks.attention.EvaAttention`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitzoo.blocks.attention import ATTENTIONS, Attention, AttentionOptions, EvaAttention
from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.options import BlockOptions, GridOptions
from vitzoo.blocks.position import same_grid
from vitzoo.blocks.rope import Rotation
from vitzoo.fields import AT_LEAST_ONE, NON_NEGATIVE, described

# torch.fx symbolic tracing keeps the einops calls as graph nodes: einops needs real tensors and shapes
torch.fx.wrap("rearrange")

Grid = tuple[int, int]
MLP_MODES = ("cr", "swin")  # how RelPosMlp spaces the offsets it reads
PREFIX_ROWS = 3  # table rows of the prefix tokens: prefix to patch, patch to prefix, prefix to prefix


@dataclass(frozen=True)
class RelPosOptions(GridOptions, AttentionOptions):
    """Options of the relative-position attentions: the grid and the prefix tokens the bias is laid out for."""

    prefix_tokens: int | None = described(
        None, "tokens in front of the patches (class, registers) the bias covers; None: the model's", NON_NEGATIVE)

    def for_model(self, spec) -> RelPosOptions:
        options = super().for_model(spec)
        if self.prefix_tokens is None:
            options = dataclasses.replace(options, prefix_tokens=spec.num_prefix_tokens)
        return options

    def check(self, spec) -> None:
        if spec.dynamic_img_size:
            raise ValueError("a relative-position bias is laid out for one patch grid, so the model takes images of "
                             "its img_size only; set dynamic_img_size=False (build the model at the size you feed)")
        if self.grid is not None and tuple(self.grid) != spec.grid_size:
            raise ValueError(f"grid={tuple(self.grid)} differs from the model's patch grid {spec.grid_size} at "
                             f"img_size={spec.img_size}; leave grid unset to follow the model")
        if self.prefix_tokens is not None and self.prefix_tokens != spec.num_prefix_tokens:
            raise ValueError(f"prefix_tokens={self.prefix_tokens} differs from the model's {spec.num_prefix_tokens} "
                             f"prefix tokens; leave prefix_tokens unset to follow the model")
        super().check(spec)


@dataclass(frozen=True)
class RelPosMlpShape(BlockOptions):
    """Options of the relative-position MLP, in a block's attention or shared by all (``attn_bias``)."""

    hidden_dim: int = described(128, "hidden width of the MLP over offsets (timm's rel_pos_dim)", AT_LEAST_ONE)
    mode: str = described(
        "cr", "offsets: cr = sign * log(1 + |d|) (timm) | swin = Swin V2's, normalized, with a 16 * sigmoid bias")

    def check(self, spec) -> None:
        if self.mode not in MLP_MODES:
            raise ValueError(f"mode={self.mode!r}; valid: {', '.join(MLP_MODES)}")


@dataclass(frozen=True)
class RelPosMlpOptions(RelPosOptions, RelPosMlpShape):
    """Options of the attention with a relative-position MLP."""


def relative_index(grid: Grid, prefix: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """``(n, n)`` row of each (query, key) pair in a table of ``(2h - 1) * (2w - 1)`` offsets, row-major from
    (-(h - 1), -(w - 1)); ``prefix`` tokens in front take the three rows after the offsets (BEiT's layout)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    coords = rearrange(torch.stack([ys, xs]), "c h w -> (h w) c")
    offset = rearrange(coords, "q c -> q 1 c") - rearrange(coords, "k c -> 1 k c")
    index = (offset[..., 0] + h - 1) * (2 * w - 1) + offset[..., 1] + w - 1
    if prefix:
        offsets = (2 * h - 1) * (2 * w - 1)
        index = F.pad(index, (prefix, 0, prefix, 0))
        index[:prefix, :] = offsets
        index[:, :prefix] = offsets + 1
        index[:prefix, :prefix] = offsets + 2
    return index


@cache
def _index_on_cpu(grid: Grid, prefix: int) -> torch.Tensor:
    return relative_index(grid, prefix, "cpu")


def shared_index(grid: Grid, prefix: int = 0) -> torch.Tensor:
    """:func:`relative_index` on the default device, computed once per grid for all blocks (the ``meta`` device
    included, where computing it per block would cost more than building the model)."""
    return _index_on_cpu(tuple(grid), prefix).to(torch.get_default_device())


def table_rows(grid: Grid, prefix: int) -> int:
    """Rows of a relative-position table for ``grid`` with ``prefix`` tokens in front."""
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + (PREFIX_ROWS if prefix else 0)


def table_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A table ``(rows, heads)`` read at ``index`` ``(n, n)``: the bias ``(1, heads, n, n)``."""
    return rearrange(table[index], "q k h -> 1 h q k").contiguous()


def with_bias(bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``bias`` plus another additive bias handed to the attention (None: none). A bool mask comes with patch
    sequences, whose tokens are not laid out on the one grid of the bias: refused."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        raise ValueError("a relative-position bias is laid out for the patch grid of one image, so this model takes "
                         "image batches, not patch sequences (vitzoo.packing)")
    return bias + mask


class RelPosTable(nn.Module):
    """A learned bias per head for each offset between patches, read from a table (timm's ``RelPosBias``;
    Swin, Liu et al. 2021; BEiT, Bao et al. 2022). The table is laid out for one grid."""

    def __init__(self, grid: Grid, num_prefix: int, num_heads: int) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.relative_position_bias_table = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(table_rows(grid, num_prefix), num_heads), std=0.02))
        self.register_buffer("index", shared_index(grid, num_prefix), persistent=False)

    def forward(self, grid: Grid | None = None) -> torch.Tensor:
        if grid is not None and not same_grid(grid, self.grid):
            raise ValueError(f"this relative-position table is laid out for a {self.grid} patch grid, got "
                             f"{tuple(grid)}; build the model at the image size you feed (img_size)")
        return table_bias(self.relative_position_bias_table, self.index)


class RelPosMlp(nn.Module):
    """A bias per head computed by a two-layer ReLU MLP from log-spaced offsets, so no table grows with the grid
    (Swin V2, Liu et al. 2022; timm's ``RelPosMlp``). ``mode="cr"``: offsets ``sign(d) * ln(1 + |d|)``, the bias
    as the MLP gives it (timm's relpos ViTs); ``"swin"``: offsets scaled to [-8, 8] then
    ``sign * log2(1 + |d|) / 3``, the bias ``16 * sigmoid`` and no bias on ``fc2``. Prefix tokens get none.
    Any grid can be asked for; the one built for is cached."""

    def __init__(
        self, grid: Grid, num_prefix: int, num_heads: int, *, options: RelPosMlpShape = RelPosMlpShape(),
    ) -> None:
        super().__init__()
        self.grid, self.prefix, self.swin = tuple(grid), num_prefix, options.mode == "swin"
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(2, options.hidden_dim)
        self.mlp.act = nn.ReLU()
        self.mlp.drop = nn.Dropout(0.125)  # timm's RelPosMlp drops hidden units in training
        self.mlp.fc2 = nn.Linear(options.hidden_dim, num_heads, bias=not self.swin)
        self.register_buffer("coords", self._log_offsets(self.grid, "cpu").to(torch.get_default_device()),
                             persistent=False)
        self.register_buffer("index", shared_index(self.grid), persistent=False)

    def _log_offsets(self, grid: Grid, device: torch.device | str) -> torch.Tensor:
        """Every offset ``(dy, dx)`` between two patches, log-spaced: ``((2h - 1) * (2w - 1), 2)``."""
        axes = [torch.arange(1 - size, size, dtype=torch.float32, device=device) for size in grid]
        if self.swin:
            axes = [8 * axis / max(size - 1, 1) for axis, size in zip(axes, grid, strict=True)]
        offsets = rearrange(torch.stack(torch.meshgrid(*axes, indexing="ij")), "c a b -> (a b) c")
        if self.swin:
            return offsets.sign() * torch.log2(1 + offsets.abs()) / math.log2(8)
        return offsets.sign() * torch.log1p(offsets.abs())

    def forward(self, grid: Grid | None = None) -> torch.Tensor:
        coords, index = self.coords, self.index
        if grid is not None and not same_grid(grid, self.grid):
            coords, index = self._log_offsets(grid, coords.device), relative_index(grid, device=index.device)
        mlp = self.mlp
        values = mlp.fc2(mlp.drop(mlp.act(mlp.fc1(coords.to(mlp.fc1.weight.dtype)))))
        bias = rearrange(values[index], "q k h -> 1 h q k")
        if self.swin:
            bias = 16 * torch.sigmoid(bias)
        return F.pad(bias, (self.prefix, 0, self.prefix, 0)).contiguous()


class RelPosAttention(Attention):
    """Multi-head attention (fused ``qkv``) plus a relative-position bias read from a table, its ``rel_pos`` module,
    on the logits (timm's ``RelPosAttention`` with ``rel_pos_type="bias"``)."""

    def __init__(
        self, dim: int, num_heads: int, norm: NormFactory, attn_drop: float = 0.0, proj_drop: float = 0.0,
        layer: int = 0, *, options: RelPosOptions,
    ) -> None:
        super().__init__(dim, num_heads, norm, attn_drop, proj_drop, layer, options=options)
        self.rel_pos = self._make_rel_pos(tuple(options.grid), options.prefix_tokens or 0, num_heads, options)

    def _make_rel_pos(self, grid: Grid, prefix: int, num_heads: int, options: RelPosOptions) -> nn.Module:
        return RelPosTable(grid, prefix, num_heads)

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, rotation, with_bias(self.rel_pos(), mask))


class RelPosMlpAttention(RelPosAttention):
    """:class:`RelPosAttention` with the bias computed by an MLP over log-spaced offsets (:class:`RelPosMlp`; timm's
    ``RelPosAttention`` as the ``vit_relpos_*`` models build it)."""

    def _make_rel_pos(self, grid: Grid, prefix: int, num_heads: int, options: RelPosMlpOptions) -> nn.Module:
        return RelPosMlp(grid, prefix, num_heads, options=options)


class BeitAttention(EvaAttention):
    """BEiT's attention: q and v biases (``q_bias``, ``v_bias``) and a relative-position table kept on the
    attention as ``relative_position_bias_table`` (Bao et al. 2022; timm's ``beit.Attention``)."""

    def __init__(
        self, dim: int, num_heads: int, norm: NormFactory, attn_drop: float = 0.0, proj_drop: float = 0.0,
        layer: int = 0, *, options: RelPosOptions,
    ) -> None:
        super().__init__(dim, num_heads, norm, attn_drop, proj_drop, layer, options=options)
        grid, prefix = tuple(options.grid), options.prefix_tokens or 0
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_rows(grid, prefix), num_heads))
        self.register_buffer("relative_position_index", shared_index(grid, prefix), persistent=False)

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        bias = table_bias(self.relative_position_bias_table, self.relative_position_index)
        return super().forward(x, rotation, with_bias(bias, mask))


ATTENTIONS.register("relpos_bias", RelPosAttention, options=RelPosOptions)
ATTENTIONS.register("relpos_mlp", RelPosMlpAttention, options=RelPosMlpOptions)
ATTENTIONS.register("beit", BeitAttention, options=RelPosOptions)
