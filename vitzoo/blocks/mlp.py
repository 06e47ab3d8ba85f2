"""Feed-forward (MLP) slot.

Contract: ``factory(dim: int, hidden_dim: int, norm: NormFactory, drop: float, *, options) -> nn.Module``
mapping ``(b, n, dim) -> (b, n, dim)``; ``norm`` is the model's norm factory and ``drop`` the dropout
after each layer. Parameter names follow timm (``fc1``/``fc2``; ``fc1_g``/``fc1_x`` for gated units).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from einops import rearrange
from torch import nn

from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.options import BlockOptions
from vitzoo.blocks.table import BlockTable
from vitzoo.fields import described

# torch.fx symbolic tracing keeps the einops calls as graph nodes: einops needs real tensors and shapes
torch.fx.wrap("rearrange")


@dataclass(frozen=True)
class MlpOptions(BlockOptions):
    """Options of every MLP entry."""

    bias: bool = described(True, "biases on the MLP's linear layers (AIMv2 has none)")


@dataclass(frozen=True)
class InnerNormMlpOptions(MlpOptions):
    """Options of the MLPs that can normalize their hidden activations."""

    inner_norm: bool = described(
        False, "norm on the hidden activations before the output layer (Sub-LN of BEiT-3; EVA-02)")


@dataclass(frozen=True)
class PackedGluOptions(InnerNormMlpOptions):
    """Options of the gated MLP packed in one ``fc1``."""

    gate_last: bool = described(
        False, "the gate is the second half of fc1 (timm's GluMlp default: gMixer); False: the first (SwiGLUPacked)")


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the GELU approximation of OpenAI CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """Two-layer feed-forward: fc1 -> activation -> fc2 (ViT, Dosovitskiy et al. 2021).

    ``inner_norm`` normalizes the hidden activations before fc2 (Sub-LN, BEiT-3; NormFormer).
    """

    def __init__(
        self, dim: int, hidden_dim: int, norm: NormFactory, drop: float = 0.0,
        act: Callable[[], nn.Module] = nn.GELU, *, options: InnerNormMlpOptions = InnerNormMlpOptions(),
    ) -> None:
        super().__init__()
        bias = options.bias
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = act()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm(hidden_dim) if options.inner_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class GatedMlp(nn.Module):
    """Gated linear unit: act(fc1_g x) * fc1_x x -> fc2 (SwiGLU, Shazeer 2020; timm ``SwiGLU``)."""

    def __init__(
        self, dim: int, hidden_dim: int, norm: NormFactory, drop: float = 0.0,
        act: Callable[[], nn.Module] = nn.SiLU, *, options: InnerNormMlpOptions = InnerNormMlpOptions(),
    ) -> None:
        super().__init__()
        bias = options.bias
        self.fc1_g = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc1_x = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = act()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm(hidden_dim) if options.inner_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1_g(x)) * self.fc1_x(x)))))


class PackedGatedMlp(nn.Module):
    """Gated linear unit with gate and value packed in one ``fc1`` of width ``hidden_dim``:
    act(first half) * second half -> fc2 from ``hidden_dim / 2`` (DINOv2 ViT-g, timm ``SwiGLUPacked``); with
    ``gate_last`` first half * act(second half) (gMixer, timm ``GluMlp``).
    """

    def __init__(
        self, dim: int, hidden_dim: int, norm: NormFactory, drop: float = 0.0,
        act: Callable[[], nn.Module] = nn.SiLU, *, options: PackedGluOptions = PackedGluOptions(),
    ) -> None:
        super().__init__()
        bias = options.bias
        self.gate_last = options.gate_last
        if hidden_dim % 2:
            raise ValueError(f"a packed gated MLP splits fc1 in two halves; hidden width {hidden_dim} is odd, "
                             f"pick mlp_ratio so that int(embed_dim * mlp_ratio) is even")
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = act()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm(hidden_dim // 2) if options.inner_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim // 2, dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = rearrange(self.fc1(x), "... (two e) -> two ... e", two=2)
        gate, value = (second, first) if self.gate_last else (first, second)
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(gate) * value))))


class NormedGatedMlp(nn.Module):
    """LayerNorm on the input, then act(w0 x) * w1 x -> w2: the GeGLU MLP of ViTamin (Chen et al. 2024;
    timm's vitamin ``GeGluMlp``, whose input norm is always a LayerNorm with eps 1e-6)."""

    def __init__(
        self, dim: int, hidden_dim: int, norm: NormFactory, drop: float = 0.0,
        act: Callable[[], nn.Module] = nn.GELU, *, options: MlpOptions = MlpOptions(),
    ) -> None:
        super().__init__()
        bias = options.bias
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


MLPS: BlockTable = BlockTable(
    "mlp", "factory(dim, hidden_dim, norm, drop, *, options) -> module (b, n, dim) -> (b, n, dim)"
)
for _name, _block, _act in (
    ("gelu", Mlp, nn.GELU), ("gelu_tanh", Mlp, partial(nn.GELU, approximate="tanh")), ("quick_gelu", Mlp, QuickGELU),
    ("relu", Mlp, nn.ReLU), ("swiglu", GatedMlp, nn.SiLU), ("geglu", GatedMlp, nn.GELU),
):
    MLPS.register(_name, partial(_block, act=_act), options=InnerNormMlpOptions)
MLPS.register("swiglu_packed", partial(PackedGatedMlp, act=nn.SiLU), options=PackedGluOptions)
MLPS.register("geglu_normed", partial(NormedGatedMlp, act=nn.GELU), options=MlpOptions)
