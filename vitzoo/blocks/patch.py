"""Patch-embedding slot.

Contract: ``factory(patch_size: int, in_chans: int, dim: int, bias: bool) -> nn.Module`` mapping
images ``(b, c, H, W) -> (b, h, w, dim)`` with ``h = H / patch_size``. The grid stays explicit in the
output so the position block can resample for any input size. Both entries store the projection as
timm does: ``proj.weight`` of shape ``(dim, c, p, p)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitzoo.blocks.table import BlockTable


class LinearPatchEmbed(nn.Module):
    """Cut the image into p x p patches with einops and project each with one matmul (ViT)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        patches = rearrange(x, "b c (h p1) (w p2) -> b h w (c p1 p2)", p1=p, p2=p)
        weight = rearrange(self.proj.weight, "d c p1 p2 -> d (c p1 p2)")
        return F.linear(patches, weight, self.proj.bias)


class ConvPatchEmbed(LinearPatchEmbed):
    """The same projection computed as a strided convolution (the original ViT code path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d h w -> b h w d")


PATCH_EMBEDS: BlockTable = BlockTable(
    "patch_embed", "factory(patch_size, in_chans, dim, bias) -> module (b, c, H, W) -> (b, h, w, dim)"
)
PATCH_EMBEDS.register("linear", LinearPatchEmbed)
PATCH_EMBEDS.register("conv", ConvPatchEmbed)
