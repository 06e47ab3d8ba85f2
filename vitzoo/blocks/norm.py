"""Normalization slot.

Contract: ``factory(dim: int, eps: float) -> nn.Module`` normalizing the last axis of ``(..., dim)``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vitzoo.blocks.table import BlockTable

NormFactory = Callable[[int], nn.Module]

NORMS: BlockTable = BlockTable("norm", "factory(dim, eps) -> module over (..., dim)")
NORMS.register("layernorm", nn.LayerNorm)
NORMS.register("rmsnorm", nn.RMSNorm)
