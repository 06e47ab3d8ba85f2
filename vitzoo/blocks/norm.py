"""Normalization slot.

Contract: ``factory(dim: int, *, options: NormOptions) -> nn.Module`` normalizing the last axis of
``(..., dim)``. Every norm of a model is this slot's entry with the same options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from vitzoo.blocks.options import BlockOptions
from vitzoo.blocks.table import BlockTable
from vitzoo.fields import POSITIVE, described

NormFactory = Callable[[int], nn.Module]


@dataclass(frozen=True)
class NormOptions(BlockOptions):
    """Options of the norm entries."""

    eps: float = described(1e-6, "added to the variance before dividing (timm 1e-6; CLIP 1e-5; HF ViT 1e-12)", POSITIVE)


def layer_norm(dim: int, *, options: NormOptions) -> nn.Module:
    """LayerNorm with a learned scale and bias (Ba et al. 2016)."""
    return nn.LayerNorm(dim, eps=options.eps)


def rms_norm(dim: int, *, options: NormOptions) -> nn.Module:
    """RMSNorm: scale by the root mean square, no centring or bias (Zhang and Sennrich 2019)."""
    return nn.RMSNorm(dim, eps=options.eps)


NORMS: BlockTable = BlockTable("norm", "factory(dim, *, options) -> module over (..., dim)")
NORMS.register("layernorm", layer_norm, options=NormOptions)
NORMS.register("rmsnorm", rms_norm, options=NormOptions)
