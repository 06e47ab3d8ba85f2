"""Encoder-block slot: how attention and MLP are wired with norms and residuals.

Contract: ``factory(dim, attn, mlp, norm, layer_scale, drop_path) -> nn.Module`` mapping
``(b, n, dim) -> (b, n, dim)``; ``attn`` and ``mlp`` are built modules, ``norm`` a norm factory,
``layer_scale`` the LayerScale init value (None disables it) and ``drop_path`` this block's
stochastic-depth rate. Parameter names follow timm's ``Block``: ``norm1``, ``attn``, ``ls1``,
``norm2``, ``mlp``, ``ls2``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.table import BlockTable


class LayerScale(nn.Module):
    """Per-channel learned residual scale, initialised small (CaiT, Touvron et al. 2021)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Drop the whole residual branch per sample (stochastic depth, Huang et al. 2016)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class _ResidualBlock(nn.Module):
    """The parts every residual wiring shares; subclasses differ only in ``forward``."""

    def __init__(
        self, dim: int, attn: nn.Module, mlp: nn.Module, norm: NormFactory,
        layer_scale: float | None = None, drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = attn
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = mlp
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()


class PreNormBlock(_ResidualBlock):
    """x + attn(norm(x)), then x + mlp(norm(x)): the pre-norm block of ViT and timm's ``Block``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class PostNormBlock(_ResidualBlock):
    """norm(x + attn(x)), then norm(x + mlp(x)): the original Transformer wiring (Vaswani et al. 2017)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop_path1(self.ls1(self.attn(x))))
        x = self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))
        return x


class ParallelBlock(_ResidualBlock):
    """x + attn(norm(x)) + mlp(norm(x)): attention and MLP side by side (GPT-J; ViT-22B)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (
            x
            + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
            + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        )


class ResPostNormBlock(_ResidualBlock):
    """x + norm(attn(x)), then x + norm(mlp(x)): the norm closes each residual branch (res-post-norm
    of Swin V2, Liu et al. 2022; timm's ``ResPostBlock``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.norm1(self.attn(x))))
        x = x + self.drop_path2(self.ls2(self.norm2(self.mlp(x))))
        return x


class ParallelBranchesBlock(nn.Module):
    """x + sum of attention branches, then x + sum of MLP branches, each branch pre-normed: wider and
    shallower at equal cost ("Three things everyone should know about ViTs", Touvron et al. 2022;
    timm's ``ParallelThingsBlock``). Branch 0 is the given module, the others are copies of it that
    the model re-initializes like every linear layer.
    """

    def __init__(
        self, dim: int, attn: nn.Module, mlp: nn.Module, norm: NormFactory, layer_scale: float | None = None,
        drop_path: float = 0.0, num_parallel: int = 2,
    ) -> None:
        super().__init__()

        def branch(name: str, module: nn.Module) -> nn.Sequential:
            return nn.Sequential(OrderedDict([
                ("norm", norm(dim)), (name, module),
                ("ls", LayerScale(dim, layer_scale) if layer_scale else nn.Identity()),
                ("drop_path", DropPath(drop_path) if drop_path > 0 else nn.Identity()),
            ]))

        self.attns = nn.ModuleList(branch("attn", attn if j == 0 else copy.deepcopy(attn)) for j in range(num_parallel))
        self.ffns = nn.ModuleList(branch("mlp", mlp if j == 0 else copy.deepcopy(mlp)) for j in range(num_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + sum(attn(x) for attn in self.attns)
        return x + sum(ffn(x) for ffn in self.ffns)


ENCODER_BLOCKS: BlockTable = BlockTable(
    "block", "factory(dim, attn, mlp, norm, layer_scale, drop_path) -> module (b, n, dim) -> (b, n, dim)"
)
ENCODER_BLOCKS.register("prenorm", PreNormBlock)
ENCODER_BLOCKS.register("postnorm", PostNormBlock)
ENCODER_BLOCKS.register("parallel", ParallelBlock)
ENCODER_BLOCKS.register("respost", ResPostNormBlock)
ENCODER_BLOCKS.register("parallel2", partial(ParallelBranchesBlock, num_parallel=2))
