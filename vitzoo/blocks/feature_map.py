"""Features slot: what ``forward_features`` returns, tokens or a feature map made inside the model.

Contract: ``factory(dim, *, options) -> nn.Module`` mapping the patch tokens as a map ``(b, dim, h, w)`` to
``(b, out_channels, h, w)``, with the attribute ``out_channels``. The model stores it as ``neck`` (timm's name
in ``VisionTransformerSAM``). With ``features="tokens"`` (the default) the model skips it and returns tokens
``(b, prefix + h * w, dim)``; with any other entry ``forward_features`` returns the map (prefix tokens dropped),
pooling reads the map's positions and the head is timm's ``ClassifierHead`` layout (``head.fc``).

Unlike the ``neck`` table of :mod:`vitzoo.blocks.neck` (multi-scale maps for a detector, built beside a model
and never in its checkpoint), this stage is part of the model and of its state_dict.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitzoo.blocks.options import BlockOptions
from vitzoo.blocks.table import BlockTable, like_module
from vitzoo.fields import AT_LEAST_ONE, POSITIVE, described

# torch.fx symbolic tracing keeps the einops calls as graph nodes: einops needs real tensors and shapes
torch.fx.wrap("rearrange")


@dataclass(frozen=True)
class MapNormOptions(BlockOptions):
    """Options of the normed feature map."""

    eps: float = described(1e-6, "epsilon of the LayerNorm over channels (timm's LayerNorm2d: 1e-6)", POSITIVE)


@dataclass(frozen=True)
class ConvNeckOptions(MapNormOptions):
    """Options of the convolutional neck."""

    channels: int = described(256, "channels of the output map (SAM: 256)", AT_LEAST_ONE)


class Unchanged(nn.Identity):
    """The last block's output as it is: tokens for ``tokens`` (the default, every timm ``VisionTransformer``),
    the patch tokens as a ``(b, dim, h, w)`` map for ``map``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_channels = dim


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(b, c, h, w)`` map at every position (timm's ``LayerNorm2d``; the
    final norm of ``samvit_base_patch16_224``, stored as ``neck.weight`` / ``neck.bias``)."""

    def __init__(self, dim: int, *, options: MapNormOptions = MapNormOptions()) -> None:
        super().__init__(dim, eps=options.eps)
        self.out_channels = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(rearrange(x, "b c h w -> b h w c"), self.normalized_shape, self.weight, self.bias, self.eps)
        return rearrange(x, "b h w c -> b c h w")


class ConvNeck(nn.Sequential):
    """1x1 conv to ``channels``, LayerNorm2d, 3x3 conv, LayerNorm2d, convs without bias: Segment Anything's image
    encoder neck (Kirillov et al. 2023), which gives the mask decoder a 256-channel map (timm's
    ``VisionTransformerSAM.neck``: ``neck.0`` .. ``neck.3``)."""

    def __init__(self, dim: int, *, options: ConvNeckOptions = ConvNeckOptions()) -> None:
        out, norm = options.channels, MapNormOptions(eps=options.eps)
        super().__init__(OrderedDict([
            ("0", nn.Conv2d(dim, out, 1, bias=False)), ("1", LayerNorm2d(out, options=norm)),
            ("2", nn.Conv2d(out, out, 3, padding=1, bias=False)), ("3", LayerNorm2d(out, options=norm)),
        ]))
        self.out_channels = out


def _map_probe(module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A ``(2, dim, 3, 4)`` map must give ``(2, out_channels, 3, 4)``."""
    out = module(torch.randn(2, args[0], 3, 4, **like_module(module)))
    return out, (2, module.out_channels, 3, 4)


FEATURE_MAPS: BlockTable = BlockTable(
    "features", "factory(dim, *, options) -> module mapping (b, dim, h, w) to (b, out_channels, h, w), with attribute "
    "out_channels", probe=_map_probe,
)
FEATURE_MAPS.register("tokens", Unchanged)
FEATURE_MAPS.register("map", Unchanged)
FEATURE_MAPS.register("norm_map", LayerNorm2d, options=MapNormOptions)
FEATURE_MAPS.register("conv_neck", ConvNeck, options=ConvNeckOptions)
