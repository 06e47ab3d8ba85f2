"""The blocks of the Gemma 4 vision tower (Gemma Team, Gemma 4 Technical Report, 2026; timm's ``gemma4_vit``):

- ``patch_embed="signed_linear"``: a linear layer over channel-first patches of pixels mapped from [0, 1] to
  [-1, 1] inside the model (``input_proj``);
- ``pos_embed="axis_tables"``: one learned table per image axis, looked up by patch index and added
  (``patch_embed.position_embedding_table``, ``(2, size, dim)``);
- ``attn="normed_qkv"``: separate q, k, v, o projections, per-head RMS norm of q, k (learned scale) and v (none),
  so the logits need no ``1 / sqrt(head_dim)`` (scale 1);
- ``mlp="geglu_tanh_proj"``: a GELU-tanh gated MLP as ``gate_proj`` / ``up_proj`` / ``down_proj``;
- ``block="sandwich"``: a norm before and after both attention and MLP (``norm1`` to ``norm4``);
- ``pool="cell_mean"``: the VLM readout, the mean of each ``k x k`` cell of the patch grid times ``sqrt(dim)``,
  optionally standardized by stored ``std_bias`` / ``std_scale``.

Every projection is a :class:`ClampedLinear` (``*.linear.weight``); the E2B/E4B tower also clamps each one's
input and output to ranges it stores (``clamp=True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange, reduce
from torch import nn

from vitzoo.blocks.attention import ATTENTIONS, AttentionOptions, attend_heads
from vitzoo.blocks.encoder import ENCODER_BLOCKS, LayerScaleOptions, _ResidualBlock
from vitzoo.blocks.mlp import MLPS, MlpOptions
from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.options import BlockOptions, GridOptions
from vitzoo.blocks.patch import PATCH_EMBEDS, ProjectionOptions, linear_patches
from vitzoo.blocks.pooling import POOLS, MlpFactory, token_grid
from vitzoo.blocks.position import POSITIONS
from vitzoo.blocks.projector import parameter_free
from vitzoo.blocks.rope import Rotation
from vitzoo.fields import AT_LEAST_ONE, POSITIVE, described

torch.fx.wrap("rearrange")
torch.fx.wrap("reduce")
torch.fx.wrap("token_grid")
CLAMPS = ("input_min", "input_max", "output_min", "output_max")
NO_LAYER_SCALE, PLAIN_PROJECTION = LayerScaleOptions(), ProjectionOptions()


def _clamp() -> bool:
    return described(False, "clamp each projection's input and output to ranges stored as its buffers input_min, "
                     "input_max, output_min, output_max (Gemma 4 E2B/E4B)")


class ClampedLinear(nn.Module):
    """A linear layer stored as ``linear.weight``, with its input and output optionally clamped to stored scalar
    ranges (Gemma 4's ``ClippableLinear``: the E2B/E4B checkpoints hold finite ranges; they start at +-inf)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, clamp: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.clamp = clamp
        for name in CLAMPS if clamp else ():
            self.register_buffer(name, torch.tensor(-math.inf if name.endswith("min") else math.inf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clamp:
            return self.linear(x)
        x = self.linear(torch.clamp(x, self.input_min, self.input_max))
        return torch.clamp(x, self.output_min, self.output_max)


@dataclass(frozen=True)
class NormedQkvOptions(AttentionOptions):
    """Options of attention with normalized q, k and v."""

    qkv_bias: bool = described(False, "biases on the q, k, v projections")
    proj_bias: bool = described(False, "bias on the output projection")
    qk_norm: bool = described(True, "normalize q and k per head with the model's norm")
    scale: float = described(1.0, "factor on the logits (1: q and k are normalized; head_dim ** -0.5 otherwise)",
                             POSITIVE)
    clamp: bool = _clamp()


class NormedQkvAttention(nn.Module):
    """Attention with separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and every head's q, k and v
    normalized (q, k with a learned scale, v without), then rotary positions and logits scaled by ``scale``
    (Gemma 4 vision; timm's ``Gemma4Attention``)."""

    def __init__(
        self, dim: int, num_heads: int, norm: NormFactory, attn_drop: float = 0.0, proj_drop: float = 0.0,
        layer: int = 0, *, options: NormedQkvOptions = NormedQkvOptions(),
    ) -> None:
        super().__init__()
        self.num_heads, self.scale, self.attn_drop = num_heads, options.scale, attn_drop
        head_dim = dim // num_heads
        self.q_proj, self.k_proj, self.v_proj = (ClampedLinear(dim, dim, options.qkv_bias, options.clamp)
                                                 for _ in range(3))
        self.o_proj = ClampedLinear(dim, dim, options.proj_bias, options.clamp)
        self.q_norm = norm(head_dim) if options.qk_norm else nn.Identity()
        self.k_norm = norm(head_dim) if options.qk_norm else nn.Identity()
        self.v_norm = parameter_free(norm(head_dim))
        self.norm = norm(dim) if options.inner_norm else nn.Identity()
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (rearrange(proj(x), "b n (h d) -> b h n d", h=self.num_heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        x = attend_heads(q, k, self.v_norm(v), self.q_norm, self.k_norm, self.attn_drop if self.training else 0.0,
                         rotation, mask=mask, scale=self.scale)
        return self.proj_drop(self.o_proj(self.norm(x)))


@dataclass(frozen=True)
class ClampedMlpOptions(MlpOptions):
    """Options of the gated MLP of clamped projections."""

    bias: bool = described(False, "biases on the MLP's linear layers")
    clamp: bool = _clamp()


class ClampedGatedMlp(nn.Module):
    """``down_proj(gelu_tanh(gate_proj x) * up_proj x)`` (GeGLU, Shazeer 2020, as Gemma 4 vision stores it; timm's
    ``Gemma4GatedMlp``)."""

    def __init__(
        self, dim: int, hidden_dim: int, norm: NormFactory, drop: float = 0.0, *,
        options: ClampedMlpOptions = ClampedMlpOptions(),
    ) -> None:
        super().__init__()
        self.gate_proj = ClampedLinear(dim, hidden_dim, options.bias, options.clamp)
        self.up_proj = ClampedLinear(dim, hidden_dim, options.bias, options.clamp)
        self.down_proj = ClampedLinear(hidden_dim, dim, options.bias, options.clamp)
        self.act = nn.GELU(approximate="tanh")
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))


class SandwichBlock(_ResidualBlock):
    """x + norm2(attn(norm1(x))), then x + norm4(mlp(norm3(x))): a norm on both ends of each residual branch
    ("sandwich" norm, CogView, Ding et al. 2021; Gemma 2-4; timm's ``Gemma4Block``)."""

    def __init__(
        self, dim: int, attn: nn.Module, mlp: nn.Module, norm: NormFactory, drop_path: float = 0.0, *,
        options: LayerScaleOptions = NO_LAYER_SCALE,
    ) -> None:
        super().__init__(dim, attn, mlp, norm, drop_path, options=options)
        self.norm3, self.norm4 = norm(dim), norm(dim)

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.norm2(self.attn(self.norm1(x), rotation, mask))))
        x = x + self.drop_path2(self.ls2(self.norm4(self.mlp(self.norm3(x)))))
        return x


class SignedLinearPatchEmbed(nn.Module):
    """Pixels in [0, 1] mapped to [-1, 1] (``2 * (x - 0.5)``), each p x p patch flattened channel-first and
    projected by ``input_proj`` (Gemma 4 vision; timm's ``Gemma4PatchEmbed``: its data config leaves images in
    [0, 1], mean 0 and std 1)."""

    def __init__(
        self, patch_size: int, in_chans: int, dim: int, norm: NormFactory, *,
        options: ProjectionOptions = PLAIN_PROJECTION,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.input_proj = nn.Linear(in_chans * patch_size * patch_size, dim, bias=options.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_patches(2 * (x - 0.5), self.input_proj.weight, self.input_proj.bias, self.patch_size)


@dataclass(frozen=True)
class AxisTableOptions(BlockOptions):
    """Options of the per-axis position tables."""

    size: int = described(10240, "rows of each axis's table: patch indices it can place (Gemma 4: 10240)",
                          AT_LEAST_ONE)

    def check(self, spec) -> None:
        if max(spec.grid_size) > self.size:
            raise ValueError(f"the patch grid {spec.grid_size} has more rows or columns than the tables' "
                             f"size={self.size}; use a smaller image or a larger size")


class AxisTablePosition(nn.Module):
    """A learned table per image axis, ``position_embedding_table[0]`` for the column and ``[1]`` for the row,
    looked up by patch index (not resized) and added: ``pos[y, x] = table[0, x] + table[1, y]`` (Gemma 4 vision,
    stored inside timm's patch embedding as ``patch_embed.position_embedding_table``)."""

    state_name = "patch_embed"

    def __init__(
        self, grid_size: tuple[int, int], dim: int, num_prefix: int, *, options: AxisTableOptions = AxisTableOptions(),
    ) -> None:
        super().__init__()
        table = torch.empty(2, options.size, dim)
        self.position_embedding_table = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))

    def init_table(self) -> None:
        return None

    def forward(self, table: None, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        x, y = self.position_embedding_table[0, :w], self.position_embedding_table[1, :h]
        return rearrange(rearrange(y, "h d -> h 1 d") + rearrange(x, "w d -> 1 w d"), "h w d -> 1 (h w) d")


@dataclass(frozen=True)
class CellMeanOptions(GridOptions):
    """Options of the k x k cell mean readout."""

    cell: int = described(3, "side of the k x k cell of patch tokens averaged into one (Gemma 4: 3)", AT_LEAST_ONE)
    standardize: bool = described(
        False, "then (x - std_bias) * std_scale with stored per-channel buffers (Gemma 4 26B/31B)")

    def check(self, spec) -> None:
        grid = self.grid or spec.grid_size  # filled from the model (GridOptions.for_model)
        if any(side % self.cell for side in grid):
            raise ValueError(f"pool='cell_mean' averages {self.cell}x{self.cell} cells, but the patch grid {grid} is "
                             f"not divisible by the cell; use an image size that is a multiple of "
                             f"{self.cell * spec.patch_size} pixels per side")
        if spec.num_prefix_tokens:
            raise ValueError("pool='cell_mean' averages cells of the patch grid; use class_token=False and "
                             "reg_tokens=0")


class CellMeanPool(nn.Module):
    """The Gemma 4 vision tower's output for its language model: the mean of each ``k x k`` cell of the patch grid,
    row-major, times ``sqrt(dim)``, optionally standardized (timm's ``Gemma4VisionPooler``; ``(b, cells, dim)``).
    Its buffers are stored at the model's top level (``std_bias``, ``std_scale``)."""

    state_name = ""
    timm_global_pool = "soft"  # the model's global_pool, as timm's Gemma 4 encoder names this readout
    pruned_pool = None  # prune_intermediate_layers(prune_head=True) keeps it, as timm's encoder does
    reads_grid = True  # the patch grid comes from the token count (pooling.token_grid)

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm: NormFactory, mlp: MlpFactory, num_prefix: int, *,
        options: CellMeanOptions = CellMeanOptions(),
    ) -> None:
        super().__init__()
        self.grid, self.cell, self.scale = options.grid, options.cell, dim**0.5
        self.standardize = options.standardize
        if self.standardize:
            self.register_buffer("std_bias", torch.zeros(dim))
            self.register_buffer("std_scale", torch.ones(dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is not None:
            raise ValueError("pool='cell_mean' reads the cells of one image grid; feed image batches, not patch "
                             "sequences")
        grid = token_grid(x, self.grid, self.cell, "pool='cell_mean'")
        x = reduce(x, "b (h kh w kw) d -> b (h w) d", "mean", h=grid[0] // self.cell, kh=self.cell,
                   kw=self.cell) * self.scale
        return (x - self.std_bias) * self.std_scale if self.standardize else x


PATCH_EMBEDS.register("signed_linear", SignedLinearPatchEmbed, options=ProjectionOptions)
POSITIONS.register("axis_tables", AxisTablePosition, options=AxisTableOptions)
ATTENTIONS.register("normed_qkv", NormedQkvAttention, options=NormedQkvOptions)
MLPS.register("geglu_tanh_proj", ClampedGatedMlp, options=ClampedMlpOptions)
ENCODER_BLOCKS.register("sandwich", SandwichBlock, options=LayerScaleOptions)
POOLS.register("cell_mean", CellMeanPool, options=CellMeanOptions)
