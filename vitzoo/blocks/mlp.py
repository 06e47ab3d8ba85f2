"""Feed-forward (MLP) slot.

Contract: ``factory(dim: int, hidden_dim: int, bias: bool, drop: float) -> nn.Module`` mapping
``(b, n, dim) -> (b, n, dim)``. Parameter names follow timm (``fc1``/``fc2``; ``fc1_g``/``fc1_x``
for gated units). The keyword ``inner_norm`` (a norm factory for the hidden activations, before
``fc2``) is passed only when a spec asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from einops import rearrange
from torch import nn

from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.table import BlockTable


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the GELU approximation of OpenAI CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """Two-layer feed-forward: fc1 -> activation -> fc2 (ViT, Dosovitskiy et al. 2021).

    ``inner_norm`` normalizes the hidden activations before fc2 (Sub-LN, BEiT-3; NormFormer).
    """

    def __init__(
        self, dim: int, hidden_dim: int, bias: bool = True, drop: float = 0.0,
        act: Callable[[], nn.Module] = nn.GELU, *, inner_norm: NormFactory | None = None,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = act()
        self.drop1 = nn.Dropout(drop)
        self.norm = inner_norm(hidden_dim) if inner_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class GatedMlp(nn.Module):
    """Gated linear unit: act(fc1_g x) * fc1_x x -> fc2 (SwiGLU, Shazeer 2020; timm ``SwiGLU``)."""

    def __init__(
        self, dim: int, hidden_dim: int, bias: bool = True, drop: float = 0.0,
        act: Callable[[], nn.Module] = nn.SiLU, *, inner_norm: NormFactory | None = None,
    ) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc1_x = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = act()
        self.drop1 = nn.Dropout(drop)
        self.norm = inner_norm(hidden_dim) if inner_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1_g(x)) * self.fc1_x(x)))))


class PackedGatedMlp(nn.Module):
    """Gated linear unit with gate and value packed in one ``fc1`` of width ``hidden_dim``:
    act(first half) * second half -> fc2 from ``hidden_dim / 2`` (DINOv2 ViT-g, timm ``SwiGLUPacked``).
    """

    def __init__(
        self, dim: int, hidden_dim: int, bias: bool = True, drop: float = 0.0,
        act: Callable[[], nn.Module] = nn.SiLU, *, inner_norm: NormFactory | None = None,
    ) -> None:
        super().__init__()
        if hidden_dim % 2:
            raise ValueError(f"a packed gated MLP splits fc1 in two halves; hidden width {hidden_dim} is odd, "
                             f"pick mlp_ratio so that int(embed_dim * mlp_ratio) is even")
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = act()
        self.drop1 = nn.Dropout(drop)
        self.norm = inner_norm(hidden_dim // 2) if inner_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim // 2, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = rearrange(self.fc1(x), "... (two e) -> two ... e", two=2)
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(gate) * value))))


class NormedGatedMlp(nn.Module):
    """LayerNorm on the input, then act(w0 x) * w1 x -> w2: the GeGLU MLP of ViTamin (Chen et al. 2024;
    timm's vitamin ``GeGluMlp``, whose input norm is always a LayerNorm with eps 1e-6)."""

    def __init__(
        self, dim: int, hidden_dim: int, bias: bool = True, drop: float = 0.0,
        act: Callable[[], nn.Module] = nn.GELU, *, inner_norm: NormFactory | None = None,
    ) -> None:
        super().__init__()
        if inner_norm is not None:
            raise ValueError("mlp='geglu_normed' already normalizes its input; set mlp_inner_norm=False")
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.w0 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = act()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.drop1 = nn.Dropout(drop)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.drop2(self.w2(self.drop1(self.act(self.w0(x)) * self.w1(x))))


MLPS: BlockTable = BlockTable("mlp", "factory(dim, hidden_dim, bias, drop) -> module (b, n, dim) -> (b, n, dim)")
MLPS.register("gelu", partial(Mlp, act=nn.GELU))
MLPS.register("gelu_tanh", partial(Mlp, act=partial(nn.GELU, approximate="tanh")))
MLPS.register("quick_gelu", partial(Mlp, act=QuickGELU))
MLPS.register("relu", partial(Mlp, act=nn.ReLU))
MLPS.register("swiglu", partial(GatedMlp, act=nn.SiLU))
MLPS.register("geglu", partial(GatedMlp, act=nn.GELU))
MLPS.register("swiglu_packed", partial(PackedGatedMlp, act=nn.SiLU))
MLPS.register("geglu_normed", partial(NormedGatedMlp, act=nn.GELU))
