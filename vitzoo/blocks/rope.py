"""Rotary position slot: 2-D RoPE, a rotation of q and k by angles that depend on each token's position.

Contract: ``factory(head_dim, grid_size, num_prefix, num_heads, depth, *, options) -> nn.Module`` with
``forward(grid) -> Rotation | None`` for a patch grid ``(h, w)`` (the rotary entries' options are
:class:`RopeOptions`). The rotation covers ``num_prefix + h * w`` tokens and leaves the prefix tokens
(class, registers) as they are, so attention applies it to the whole sequence. A rotation may differ per
layer and head (``(depth, heads, n, head_dim)``, learned frequencies); the model hands block ``i`` its
:meth:`Rotation.layer`. Fixed rotations store nothing in the state_dict, as in timm. Only the ``none`` entry
returns None: the model skips it by name, so a ``torch.fx`` graph, where the call is one opaque node, knows
without running it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from einops import rearrange, repeat
from torch import nn

from vitzoo.blocks.options import BlockOptions
from vitzoo.blocks.position import same_grid
from vitzoo.blocks.table import BlockTable
from vitzoo.fields import AT_LEAST_ONE, POSITIVE, described

Grid = tuple[int, int]


@dataclass(frozen=True)
class RopeOptions(BlockOptions):
    """Options of the rotary entries."""

    temperature: float | None = described(
        None, "frequency base; None: the entry's own (axial 1e4, dinov3 and axial_split 100, mixed 10)", POSITIVE)
    ref_grid: tuple[int, int] | None = described(
        None, "positions rescaled to this patch grid, the one of pretraining (EVA-02)", AT_LEAST_ONE)
    grid_offset: float = described(0.0, "added to every position (Perception Encoder: 1)")
    xy: bool = described(False, "coordinate channels ordered (x, y) instead of (y, x) (ROPE-ViT, Perception Encoder)")
    rescale: float | None = described(
        None, "training only: positions times one random factor, log-uniform in [1/R, R], per call (DINOv3)",
        AT_LEAST_ONE)

    def check(self, spec) -> None:
        head_dim = spec.embed_dim // spec.num_heads
        if head_dim % 4:
            raise ValueError(f"2-D RoPE splits each head in 4 parts; head_dim = embed_dim / num_heads = {head_dim} "
                             f"is not divisible by 4")


class Rotation(NamedTuple):
    """Rotate channel ``i`` of q or k with channel ``pair[i]``: ``x * cos + x[..., pair] * sin``."""

    cos: torch.Tensor  # ([depth,] heads or 1, n, head_dim), or (n, head_dim); 1 on prefix tokens
    sin: torch.Tensor  # like cos, with the sign of the rotation folded in; 0 on prefix tokens
    pair: torch.Tensor  # (head_dim,) the channel each channel turns with
    per_layer: bool = False  # cos and sin lead with a depth axis: each block has its own

    def layer(self, i: int) -> Rotation:
        """The rotation block ``i`` uses: its own slice when the rotation differs per layer."""
        return Rotation(self.cos[i], self.sin[i], self.pair) if self.per_layer else self

    def tokens(self, index: torch.Tensor) -> Rotation:
        """The rotation of a subset of the tokens, ``index`` ``(b, k)`` per image (a masked autoencoder's visible
        tokens): cos and sin gain a batch axis, ``([depth,] b, heads or 1, k, head_dim)``."""
        if self.cos.ndim == 2:
            pattern = "b k d -> b 1 k d"
        else:
            pattern = "l h b k d -> l b h k d" if self.per_layer else "h b k d -> b h k d"
        return Rotation(*(rearrange(t[..., index, :], pattern) for t in (self.cos, self.sin)), self.pair,
                        self.per_layer)


def rotate(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Apply a :class:`Rotation` to q or k ``(b, heads, n, head_dim)``."""
    return x * rotation.cos + x[..., rotation.pair] * rotation.sin


class AxialRope(nn.Module):
    """Axial 2-D RoPE with one frequency ladder per image axis and interleaved channel pairs ``(2i, 2i+1)``:
    a quarter of the head channels rotate with the row, a quarter with the column, each at
    ``temperature ** -(j / (head_dim / 4))`` (RoFormer, Su et al. 2021, in 2-D as in EVA-02, Fang et al.
    2023; ROPE-ViT, Heo et al. 2024; Perception Encoder, Bolya et al. 2025; timm's ``RotaryEmbeddingCat``).
    """

    default_temperature = 10000.0
    rotate_half = False
    learned = False  # learned frequencies: rebuilt every call so gradients reach them, never cached

    def __init__(
        self, head_dim: int, grid_size: Grid, num_prefix: int, num_heads: int = 1, depth: int = 1, *,
        options: RopeOptions = RopeOptions(),
    ) -> None:
        super().__init__()
        self.head_dim, self.grid_size, self.num_prefix = head_dim, tuple(grid_size), num_prefix
        temperature = options.temperature
        self.temperature = self.default_temperature if temperature is None else float(temperature)
        self.ref_grid, self.grid_offset, self.xy = options.ref_grid, options.grid_offset, options.xy
        self.rescale = options.rescale
        self.register_buffer("pair", self._pairing()[0], persistent=False)
        self._init_frequencies(num_heads, depth)
        self.register_buffer("cached", None if self.learned else self._build(self.grid_size), persistent=False)

    def _init_frequencies(self, num_heads: int, depth: int) -> None:
        """Fixed frequencies need no state; learned ones are created here."""

    def _pairing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The partner of each channel and the sign its partner enters with."""
        half = self.head_dim // 2
        if self.rotate_half:  # channel i turns with i + head_dim / 2: (-x_{i+half}, x_i)
            return torch.arange(self.head_dim).roll(half), torch.tensor([-1.0, 1.0]).repeat_interleave(half)
        pairs = rearrange(torch.arange(self.head_dim), "(k two) -> k two", two=2).flip(-1)  # 2i with 2i + 1
        return rearrange(pairs, "k two -> (k two)"), torch.tensor([-1.0, 1.0]).repeat(half)

    def _axis(self, size: int, ref: int | None) -> torch.Tensor:
        t = torch.arange(size, dtype=torch.float32) + self.grid_offset
        return t if ref is None else t / size * ref

    def coords(self, grid: Grid) -> torch.Tensor:
        """Token positions ``(h * w, 2)``, row-major, channels (y, x) or (x, y)."""
        refs = self.ref_grid or (None, None)
        ys, xs = torch.meshgrid(self._axis(grid[0], refs[0]), self._axis(grid[1], refs[1]), indexing="ij")
        coords = torch.stack([xs, ys] if self.xy else [ys, xs], dim=-1)
        return rearrange(coords, "h w c -> (h w) c")

    def angles(self, coords: torch.Tensor) -> torch.Tensor:
        """Angles ``(n, head_dim / 2)``: each coordinate at each of ``head_dim / 4`` frequencies."""
        quarter = self.head_dim // 4
        bands = 1.0 / self.temperature ** (torch.arange(quarter).float() / quarter)
        return rearrange(coords[..., None] * bands.to(coords.device), "n c f -> n (c f)")

    def _build(self, grid: Grid, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """cos and signed sin stacked: ``(2, [depth, heads,] num_prefix + h * w, head_dim)``."""
        angles = self.angles(self.coords(grid).to(self.pair.device) * scale)
        sign = self._pairing()[1].to(angles.device)
        cos, sin = self._spread(angles.cos()), self._spread(angles.sin()) * sign
        prefix = cos.new_zeros(*cos.shape[:-2], self.num_prefix, self.head_dim)
        return torch.stack([torch.cat([prefix + 1, cos], dim=-2), torch.cat([prefix, sin], dim=-2)])

    def _spread(self, t: torch.Tensor) -> torch.Tensor:
        """``(..., n, head_dim / 2)`` per-angle values -> ``(..., n, head_dim)``, each at both channels of its pair."""
        layout = "... n k -> ... n (two k)" if self.rotate_half else "... n k -> ... n (k two)"
        return repeat(t, layout, two=2)

    def forward(self, grid: Grid) -> Rotation:
        if self.training and self.rescale:  # DINOv3's training-time position augmentation
            bound = math.log(self.rescale)
            table = self._build(grid, torch.empty(1, device=self.pair.device).uniform_(-bound, bound).exp())
        elif self.cached is not None and same_grid(grid, self.grid_size):
            table = self.cached
        else:
            table = self._build(grid)
        return Rotation(table[0], table[1], self.pair, per_layer=table.ndim == 5)


class DinoV3Rope(AxialRope):
    """2-D RoPE on patch centres normalized to [-1, 1], periods ``temperature ** (2j / (head_dim / 2))``, and
    channel ``i`` paired with ``i + head_dim / 2`` (DINOv3, Siméoni et al. 2025; timm's ``RotaryEmbeddingDinoV3``).
    Positions are relative to the image, so any grid reuses the same angles range.
    """

    default_temperature = 100.0
    rotate_half = True

    def _axis(self, size: int, ref: int | None) -> torch.Tensor:
        # a float range from 0 (not arange(0.5, size)): the ONNX exporter types arange(0.5, n) as int64
        return (torch.arange(size, dtype=torch.float32) + 0.5 + self.grid_offset) / size

    def coords(self, grid: Grid) -> torch.Tensor:
        return 2.0 * super().coords(grid) - 1.0

    def angles(self, coords: torch.Tensor) -> torch.Tensor:
        quarter = self.head_dim // 4
        periods = self.temperature ** (2.0 * torch.arange(quarter).float() / (self.head_dim // 2))
        return rearrange(2 * math.pi * coords[..., None] / periods.to(coords.device), "n c f -> n (c f)")


class AxialHalfRope(AxialRope):
    """Axial 2-D RoPE (as ``axial``) with channel ``i`` paired with ``i + head_dim / 2`` ("rotate half") instead of
    interleaved pairs: the vision RoPE of Qwen2-VL / Qwen3-VL and DeepSeek-V4 (timm's ``RotaryEmbeddingCat`` with
    ``rotate_half=True``)."""

    rotate_half = True


class AxialSplitRope(AxialRope):
    """Axial 2-D RoPE with each axis in its own half of the head (x first with ``xy=True``) and "rotate half" inside
    each half: channel ``i`` of a half pairs with ``i + head_dim / 4`` of it (Gemma 4 vision; timm's
    ``Gemma4RotaryEmbedding2D`` with ``apply_multidimensional_rope``)."""

    default_temperature = 100.0

    def _pairing(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = rearrange(torch.arange(self.head_dim), "(c two f) -> c two f", c=2, two=2)
        sign = repeat(torch.tensor([-1.0, 1.0]), "two -> (c two f)", c=2, f=self.head_dim // 4)
        return rearrange(parts.flip(1), "c two f -> (c two f)"), sign

    def _spread(self, t: torch.Tensor) -> torch.Tensor:
        return repeat(t, "... n (c f) -> ... n (c two f)", c=2, two=2)


class MixedRope(AxialRope):
    """RoPE-Mixed: learned 2-D frequencies per layer and head, each angle a mix of x and y, so heads can
    attend along diagonals (ROPE-ViT, Heo et al. 2024; timm's ``RotaryEmbeddingMixed``). The frequencies
    are the model's ``rope.freqs`` ``(2, depth, heads, head_dim / 2)``, initialized as axial bands turned
    by a random angle per head."""

    default_temperature = 10.0
    learned = True

    def _init_frequencies(self, num_heads: int, depth: int) -> None:
        magnitude = 1.0 / self.temperature ** (torch.arange(0, self.head_dim, 4).float() / self.head_dim)
        turn = torch.rand(depth, num_heads, 1) * 2 * math.pi
        fx = torch.cat([magnitude * torch.cos(turn), magnitude * torch.cos(turn + math.pi / 2)], dim=-1)
        fy = torch.cat([magnitude * torch.sin(turn), magnitude * torch.sin(turn + math.pi / 2)], dim=-1)
        self.freqs = nn.Parameter(torch.stack([fx, fy]))

    def angles(self, coords: torch.Tensor) -> torch.Tensor:
        x, y = rearrange(coords, "n c -> c n 1")
        return x * self.freqs[0][..., None, :] + y * self.freqs[1][..., None, :]


class NoRope(nn.Module):
    """No rotary embedding: attention sees positions only through the position table (ViT)."""

    def __init__(self, head_dim: int, grid_size: Grid, num_prefix: int, num_heads: int, depth: int) -> None:
        super().__init__()

    def forward(self, grid: Grid) -> None:
        return None


def _rope_probe(module: nn.Module, args: tuple) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``forward(grid_size)`` must rotate ``num_prefix + h * w`` tokens of ``head_dim`` channels, or be None."""
    head_dim, grid_size, num_prefix = args[:3]
    expected = (num_prefix + grid_size[0] * grid_size[1], head_dim)
    out = module(tuple(grid_size))
    if out is None:  # nothing to rotate, allowed
        return torch.empty(expected), expected
    return out.cos.reshape(-1, *out.cos.shape[-2:])[0], expected  # one layer's and head's table


ROPES: BlockTable = BlockTable(
    "rope", "factory(head_dim, grid_size, num_prefix, num_heads, depth, *, options) -> module with forward(grid) "
    "-> Rotation of ([depth, heads,] num_prefix + h * w, head_dim) or None",
    probe=_rope_probe,
)
ROPES.register("none", NoRope)
ROPES.register("axial", AxialRope, options=RopeOptions)
ROPES.register("axial_half", AxialHalfRope, options=RopeOptions)
ROPES.register("axial_split", AxialSplitRope, options=RopeOptions)
ROPES.register("dinov3", DinoV3Rope, options=RopeOptions)
ROPES.register("mixed", MixedRope, options=RopeOptions)
