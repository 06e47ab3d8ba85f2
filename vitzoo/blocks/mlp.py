"""Feed-forward (MLP) slot.

Contract: ``factory(dim: int, hidden_dim: int, bias: bool, drop: float) -> nn.Module`` mapping
``(b, n, dim) -> (b, n, dim)``. Parameter names follow timm (``fc1``/``fc2``; ``fc1_g``/``fc1_x``
for gated units).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from vitzoo.blocks.table import BlockTable


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the GELU approximation of OpenAI CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """Two-layer feed-forward: fc1 -> activation -> fc2 (ViT, Dosovitskiy et al. 2021)."""

    def __init__(
        self, dim: int, hidden_dim: int, bias: bool = True, drop: float = 0.0,
        act: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = act()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class GatedMlp(nn.Module):
    """Gated linear unit: act(fc1_g x) * fc1_x x -> fc2 (SwiGLU, Shazeer 2020; timm ``SwiGLU``)."""

    def __init__(
        self, dim: int, hidden_dim: int, bias: bool = True, drop: float = 0.0,
        act: Callable[[], nn.Module] = nn.SiLU,
    ) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc1_x = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = act()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1_g(x)) * self.fc1_x(x))))


MLPS: BlockTable = BlockTable("mlp", "factory(dim, hidden_dim, bias, drop) -> module (b, n, dim) -> (b, n, dim)")
MLPS.register("gelu", partial(Mlp, act=nn.GELU))
MLPS.register("gelu_tanh", partial(Mlp, act=partial(nn.GELU, approximate="tanh")))
MLPS.register("quick_gelu", partial(Mlp, act=QuickGELU))
MLPS.register("relu", partial(Mlp, act=nn.ReLU))
MLPS.register("swiglu", partial(GatedMlp, act=nn.SiLU))
MLPS.register("geglu", partial(GatedMlp, act=nn.GELU))
