"""Neck slot: turns a ViT's single feature map into the multi-scale maps detectors and segmenters expect.

Contract: ``factory(dim, patch_size, *, options) -> nn.Module`` mapping one map ``(b, dim, h, w)`` (stride
``patch_size``) to a list of maps ``(b, out_channels, h * s, w * s)``, one per scale ``s``, finest first.
The module exposes ``out_channels`` and ``strides`` (``patch_size / s`` per map, in pixels), which a
detector needs for its anchors and RoI pooling.

A neck is not part of :class:`~vitzoo.spec.ViTSpec`: timm's checkpoints hold no neck, so a spec (and the
weights it loads) stays the backbone alone; :func:`vitzoo.detection_backbone` builds the neck beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

from vitzoo.blocks.norm import NORMS, NormOptions
from vitzoo.blocks.options import BlockOptions
from vitzoo.blocks.table import BlockTable, like_module
from vitzoo.fields import AT_LEAST_ONE, POSITIVE, described

# torch.fx symbolic tracing keeps the einops calls as graph nodes: einops needs real tensors and shapes
torch.fx.wrap("rearrange")

SCALES = (4.0, 2.0, 1.0, 0.5)  # the resamplings a simple pyramid knows: 2 transposed convs, 1, none, max-pool


@dataclass(frozen=True)
class SimplePyramidOptions(BlockOptions):
    """Options of the ViTDet simple feature pyramid."""

    out_channels: int = described(256, "channels of every output map (detectron2 and torchvision FPNs: 256)",
                                  AT_LEAST_ONE)
    scales: tuple[float, ...] = described(
        SCALES, "resampling of the ViT map per level, finest first: 4, 2, 1 or 0.5 (strides patch/4 .. 2*patch)",
        POSITIVE)
    norm: str = described("layernorm", "norm over channels after each conv: a norm entry or 'none' (conv biases)")
    eps: float = described(1e-6, "epsilon of that norm (ViTDet's LayerNorm: 1e-6)", POSITIVE)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.scales or any(s not in SCALES for s in self.scales):
            raise ValueError(f"SimplePyramidOptions.scales={self.scales} must be taken from {SCALES}")
        if any(a <= b for a, b in zip(self.scales, self.scales[1:], strict=False)):
            raise ValueError(f"SimplePyramidOptions.scales={self.scales} must be decreasing (finest map first, "
                             f"the order torchvision's RoI pooling reads), e.g. {SCALES}")
        if self.norm != "none" and self.norm not in NORMS:
            raise ValueError(f"SimplePyramidOptions.norm={self.norm!r} is not a norm; use 'none' or one of "
                             f"{NORMS.known_names()}")


class ChannelNorm(nn.Module):
    """A norm entry applied over the channels of a ``(b, c, h, w)`` map at every position (ViTDet's "LN")."""

    def __init__(self, channels: int, name: str, eps: float) -> None:
        super().__init__()
        self.norm = NORMS.build(name, channels, options=NormOptions(eps=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.norm(rearrange(x, "b c h w -> b h w c")), "b h w c -> b c h w")


def _conv_init(module: nn.Module) -> nn.Module:
    """detectron2's ``c2_xavier_fill`` for the pyramid's convs: uniform fan-in init (a=1), zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_uniform_(m.weight, a=1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class PyramidLevel(nn.Module):
    """One level of the simple pyramid: resample the ViT map by ``scale``, then 1x1 conv + norm, 3x3 conv + norm.

    ×4 is two stride-2 transposed convs with norm + GELU between (halving the channels each time), ×2 one
    transposed conv, ×1 nothing and ×0.5 a 2x2 max-pool, as in detectron2's ``SimpleFeaturePyramid``.
    """

    def __init__(self, dim: int, scale: float, options: SimplePyramidOptions) -> None:
        super().__init__()
        norm = nn.Identity if options.norm == "none" else (lambda c: ChannelNorm(c, options.norm, options.eps))
        if scale == 4.0:
            self.resample = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), norm(dim // 2), nn.GELU(),
                                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2))
            width = dim // 4
        elif scale == 2.0:
            self.resample, width = nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
        elif scale == 1.0:
            self.resample, width = nn.Identity(), dim
        else:
            self.resample, width = nn.MaxPool2d(2, stride=2), dim
        bias, out = options.norm == "none", options.out_channels
        self.project = nn.Sequential(nn.Conv2d(width, out, 1, bias=bias), norm(out),
                                     nn.Conv2d(out, out, 3, padding=1, bias=bias), norm(out))
        _conv_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.resample(x))


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li, Mao, Girshick, He 2022): maps at strides patch/4, patch/2, patch
    and 2*patch built from the last block's map alone, without the top-down path of an FPN."""

    def __init__(self, dim: int, patch_size: int, *, options: SimplePyramidOptions) -> None:
        super().__init__()
        if (4.0 in options.scales and dim % 4) or (2.0 in options.scales and dim % 2):
            raise ValueError(f"the x4 and x2 levels halve the width {dim} twice and once; use a width divisible "
                             f"by 4 (or 2 without the x4 level), or other scales")
        self.levels = nn.ModuleList(PyramidLevel(dim, s, options) for s in options.scales)
        self.out_channels = options.out_channels
        self.strides = tuple(patch_size / s for s in options.scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [level(x) for level in self.levels]


def neck_probe(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, tuple[tuple[int, ...], ...]]:
    """Probe for the neck slot: a ``(2, dim, 4, 4)`` map at stride ``patch_size = args[1]`` must give one
    ``(2, out_channels, 4 * patch / stride, ...)`` map per entry of ``module.strides``."""
    dim, patch_size = args[:2]
    x = torch.randn(2, dim, 4, 4, **like_module(module))
    sizes = [math.floor(4 * patch_size / stride) for stride in module.strides]
    return module(x), tuple((2, module.out_channels, s, s) for s in sizes)


NECKS: BlockTable = BlockTable(
    "neck", "factory(dim, patch_size, *, options) -> module mapping (b, dim, h, w) to a list of "
    "(b, out_channels, h*s, w*s) maps, finest first, with attributes out_channels and strides", probe=neck_probe)
NECKS.register("simple_pyramid", SimplePyramid, options=SimplePyramidOptions)
