"""Encoder-block slot: how attention and MLP are wired with norms and residuals.

Contract: ``factory(dim, attn, mlp, norm, drop_path, *, options) -> nn.Module`` with
``forward(x, rotation, mask=None)`` mapping ``(b, n, dim) -> (b, n, dim)``; ``attn`` and ``mlp`` are built
modules, ``norm`` a norm factory, ``drop_path`` this block's stochastic-depth rate, and ``rotation`` and ``mask``
what the block hands to its attention (rotary positions, None without RoPE; the keys each query may see, None:
all, or a float bias on the logits). Parameter names follow timm's ``Block``: ``norm1``, ``attn``,
``ls1``, ``norm2``, ``mlp``, ``ls2``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from vitzoo.blocks.attention import Attention, DiffAttention, attend, differential_attend
from vitzoo.blocks.mlp import Mlp
from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.options import BlockOptions
from vitzoo.blocks.rope import Rotation
from vitzoo.blocks.table import BlockTable, like_module
from vitzoo.fields import POSITIVE, described


@dataclass(frozen=True)
class LayerScaleOptions(BlockOptions):
    """Options of every encoder-block entry."""

    layer_scale: float | None = described(
        None, "initial value of LayerScale, a learned per-channel scale of each residual branch (CaiT); None: off",
        POSITIVE)


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
        self, dim: int, attn: nn.Module, mlp: nn.Module, norm: NormFactory, drop_path: float = 0.0, *,
        options: LayerScaleOptions = LayerScaleOptions(),
    ) -> None:
        super().__init__()
        layer_scale = options.layer_scale
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

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rotation, mask)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class PostNormBlock(_ResidualBlock):
    """norm(x + attn(x)), then norm(x + mlp(x)): the original Transformer wiring (Vaswani et al. 2017)."""

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.drop_path1(self.ls1(self.attn(x, rotation, mask))))
        x = self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))
        return x


class ParallelBlock(_ResidualBlock):
    """x + attn(norm(x)) + mlp(norm(x)): attention and MLP side by side (GPT-J; ViT-22B)."""

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return (
            x
            + self.drop_path1(self.ls1(self.attn(self.norm1(x), rotation, mask)))
            + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        )


class ResPostNormBlock(_ResidualBlock):
    """x + norm(attn(x)), then x + norm(mlp(x)): the norm closes each residual branch (res-post-norm
    of Swin V2, Liu et al. 2022; timm's ``ResPostBlock``)."""

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.norm1(self.attn(x, rotation, mask))))
        x = x + self.drop_path2(self.ls2(self.norm2(self.mlp(x))))
        return x


class EvaBlock(_ResidualBlock):
    """The pre-norm block with its LayerScale stored as bare ``gamma_1`` / ``gamma_2`` parameters (BEiT, Bao
    et al. 2022; EVA-02, Fang et al. 2023; DINOv3; timm's ``EvaBlock``): same computation as ``prenorm``,
    the checkpoint layout of the Eva family. ``scale_mlp=False`` scales the attention branch only (Sapiens2,
    registered as ``eva_attn_scale``)."""

    def __init__(
        self, dim: int, attn: nn.Module, mlp: nn.Module, norm: NormFactory, drop_path: float = 0.0,
        scale_mlp: bool = True, *, options: LayerScaleOptions = LayerScaleOptions(),
    ) -> None:
        super().__init__(dim, attn, mlp, norm, drop_path)
        layer_scale = options.layer_scale
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale and scale_mlp else None

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self._scale(self.attn(self.norm1(x), rotation, mask), self.gamma_1))
        x = x + self.drop_path2(self._scale(self.mlp(self.norm2(x)), self.gamma_2))
        return x

    @staticmethod
    def _scale(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        return x if gamma is None else x * gamma


class ParallelBranchesBlock(nn.Module):
    """x + sum of attention branches, then x + sum of MLP branches, each branch pre-normed: wider and
    shallower at equal cost ("Three things everyone should know about ViTs", Touvron et al. 2022;
    timm's ``ParallelThingsBlock``). Branch 0 is the given module, the others are copies of it that
    the model re-initializes like every linear layer.
    """

    def __init__(
        self, dim: int, attn: nn.Module, mlp: nn.Module, norm: NormFactory, drop_path: float = 0.0,
        num_parallel: int = 2, *, options: LayerScaleOptions = LayerScaleOptions(),
    ) -> None:
        super().__init__()
        layer_scale = options.layer_scale

        def branch(name: str, module: nn.Module) -> nn.Sequential:
            return nn.Sequential(OrderedDict([
                ("norm", norm(dim)), (name, module),
                ("ls", LayerScale(dim, layer_scale) if layer_scale else nn.Identity()),
                ("drop_path", DropPath(drop_path) if drop_path > 0 else nn.Identity()),
            ]))

        self.attns = nn.ModuleList(branch("attn", attn if j == 0 else copy.deepcopy(attn)) for j in range(num_parallel))
        self.ffns = nn.ModuleList(branch("mlp", mlp if j == 0 else copy.deepcopy(mlp)) for j in range(num_parallel))

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + sum(b.drop_path(b.ls(b.attn(b.norm(x), rotation, mask))) for b in self.attns)
        return x + sum(ffn(x) for ffn in self.ffns)


class ParallelScalingBlock(nn.Module):
    """x + attn_out_proj(attention) + mlp_out_proj(act(hidden)), where one ``in_proj`` matmul makes the MLP
    hidden units and q, k, v together (rows ``[fc1 | q | k | v]``): ViT-22B's parallel block (Dehghani et
    al. 2023; timm's ``ParallelScalingBlock``, the ``*_xp_*`` and ``pwee`` models).

    It takes the slot's attention and MLP modules apart: their q/k norms, activation and output
    projections are kept (as ``q_norm``, ``k_norm``, ``attn_out_proj``, ``mlp_out_proj``) and their
    input projections are fused, so it needs the plain ``mhsa`` attention and a two-layer MLP. As in
    timm, the fused projection has a bias only with ``qkv_bias``; otherwise the MLP half gets its own
    ``mlp_bias``.
    """

    fuses: type[nn.Module] = Attention  # the attention block this block takes apart

    def __init__(
        self, dim: int, attn: nn.Module, mlp: nn.Module, norm: NormFactory, drop_path: float = 0.0, *,
        options: LayerScaleOptions = LayerScaleOptions(),
    ) -> None:
        super().__init__()
        if type(attn) is not self.fuses or type(mlp) is not Mlp or not isinstance(attn.norm, nn.Identity):
            raise ValueError(f"this parallel block fuses {self.fuses.__name__} without inner norm with a two-layer "
                             f"MLP (gelu, relu, ...); got {type(attn).__name__} and {type(mlp).__name__}")
        qkv_bias = attn.qkv.bias is not None
        self.num_heads, self.attn_drop, self.hidden_dim = attn.num_heads, attn.attn_drop, mlp.fc1.out_features
        self.in_norm = norm(dim)
        self.in_proj = nn.Linear(dim, self.hidden_dim + attn.qkv.out_features, bias=qkv_bias)
        self.mlp_bias = None if qkv_bias else nn.Parameter(torch.zeros(self.hidden_dim))
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.mlp_act, self.mlp_drop = mlp.act, mlp.drop1
        self._make_output(attn, mlp)
        self.ls = LayerScale(dim, options.layer_scale) if options.layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _make_output(self, attn: nn.Module, mlp: nn.Module) -> None:
        self.attn_out_proj, self.mlp_out_proj = attn.proj, mlp.fc2

    def _attend(self, qkv: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None) -> torch.Tensor:
        dropout = self.attn_drop if self.training else 0.0
        return attend(qkv, self.num_heads, self.q_norm, self.k_norm, dropout, rotation, mask)

    def _output(self, attended: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.attn_out_proj(attended) + self.mlp_out_proj(hidden)

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden, qkv = self.in_proj(self.in_norm(x)).split([self.hidden_dim, 3 * x.shape[-1]], dim=-1)
        if self.mlp_bias is not None:
            hidden = hidden + self.mlp_bias
        y = self._output(self._attend(qkv, rotation, mask), self.mlp_drop(self.mlp_act(hidden)))
        return x + self.drop_path(self.ls(y))


class DiffParallelScalingBlock(ParallelScalingBlock):
    """:class:`ParallelScalingBlock` with differential attention (Ye et al. 2025) and one ``out_proj`` over
    the concatenated [attention | MLP] outputs (timm's ``DiffParallelScalingBlock``, the ``dpwee`` model).
    Takes the ``diff`` attention apart: its lambdas and ``sub_norm`` live on the block, as in timm."""

    fuses = DiffAttention

    def __init__(
        self, dim: int, attn: nn.Module, mlp: nn.Module, norm: NormFactory, drop_path: float = 0.0, *,
        options: LayerScaleOptions = LayerScaleOptions(),
    ) -> None:
        super().__init__(dim, attn, mlp, norm, drop_path, options=options)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            attn.lambda_q1, attn.lambda_k1, attn.lambda_q2, attn.lambda_k2,
        )
        self.sub_norm, self.lambda_init = attn.sub_norm, attn.lambda_init

    def _make_output(self, attn: nn.Module, mlp: nn.Module) -> None:
        self.out_proj = nn.Linear(attn.proj.in_features + mlp.fc2.in_features, attn.proj.out_features,
                                  bias=attn.proj.bias is not None)

    def _attend(self, qkv: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None) -> torch.Tensor:
        if rotation is not None:
            raise ValueError("block='diff_parallel_scaling' does not support rotary positions; use rope='none'")
        lambdas = (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2)
        return differential_attend(qkv, self.num_heads, self.q_norm, self.k_norm, lambdas, self.lambda_init,
                                   self.sub_norm, self.attn_drop if self.training else 0.0, mask)

    def _output(self, attended: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.cat([attended, hidden], dim=-1))


def _block_probe(module: nn.Module, args: tuple) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``forward(x, None)`` on ``(2, 5, dim)`` tokens must keep their shape."""
    x = torch.randn(2, 5, args[0], **like_module(module))
    return module(x, None), tuple(x.shape)


ENCODER_BLOCKS: BlockTable = BlockTable(
    "block", "factory(dim, attn, mlp, norm, drop_path, *, options) -> module with forward(x, rotation, mask=None) "
    "(b, n, dim) -> (b, n, dim)", probe=_block_probe,
)
for _name, _factory in (
    ("prenorm", PreNormBlock), ("postnorm", PostNormBlock), ("parallel", ParallelBlock), ("respost", ResPostNormBlock),
    ("parallel2", partial(ParallelBranchesBlock, num_parallel=2)), ("parallel_scaling", ParallelScalingBlock),
    ("diff_parallel_scaling", DiffParallelScalingBlock), ("eva", EvaBlock),
    ("eva_attn_scale", partial(EvaBlock, scale_mlp=False)),
):
    ENCODER_BLOCKS.register(_name, _factory, options=LayerScaleOptions)
