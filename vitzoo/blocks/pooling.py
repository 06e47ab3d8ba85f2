"""Pooling (readout) slot: turns the token sequence into one vector per image.

Contract: ``factory(dim, num_heads, mlp_ratio, norm, mlp, num_prefix, *, options) -> nn.Module`` with
``forward(x, valid=None)`` mapping ``(b, n, dim) -> (b, dim)``; ``norm`` is the model's norm factory,
``mlp(dim, hidden_dim)`` builds the model's MLP entry, and ``num_prefix`` counts the class/distillation/register
tokens at the front of the sequence. ``valid`` (bool ``(b, n)``, None: all) marks the real tokens of images of
different sizes padded to one length (:mod:`vitzoo.packing`); padding must not change the result.
The model stores the pooling module as ``attn_pool``, timm's name for its only pooling block with
weights; the parameter-free readouts leave no keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn

from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.options import BlockOptions
from vitzoo.blocks.table import BlockTable, like_module
from vitzoo.fields import AT_LEAST_ONE, POSITIVE, described

if TYPE_CHECKING:
    from vitzoo.spec import ViTSpec

# torch.fx symbolic tracing keeps the einops calls as graph nodes: einops needs real tensors and shapes
torch.fx.wrap("rearrange")
torch.fx.wrap("reduce")
torch.fx.wrap("repeat")


@dataclass(frozen=True)
class PoolOptions(BlockOptions):
    """Options of the readouts over patch tokens."""

    include_prefix: bool = described(False, "also read the class and register tokens (timm's pool_include_prefix)")


@dataclass(frozen=True)
class AttentionPoolOptions(PoolOptions):
    """Options of attention pooling."""

    num_heads: int | None = described(
        None, "heads of the pooling attention; None: the model's num_heads (Perception Encoder: 8)", AT_LEAST_ONE)
    mlp_ratio: float | None = described(
        None, "hidden width / embed_dim of the pooling MLP; None: the model's mlp_ratio", POSITIVE)

    def check(self, spec) -> None:
        if self.num_heads is not None and spec.embed_dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide embed_dim={spec.embed_dim}")
        if self.mlp_ratio is not None and spec.embed_dim * self.mlp_ratio < 1:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} gives an MLP of hidden width 0; use at least 1 / embed_dim")


MlpFactory = Callable[[int, int], nn.Module]


class _Readout(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm: NormFactory, mlp: MlpFactory, num_prefix: int, *,
        options: PoolOptions = PoolOptions(),
    ) -> None:
        super().__init__()
        self.num_prefix = 0 if options.include_prefix else num_prefix

    def _read(self, x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tokens this readout reads (the prefix tokens left out unless included) and which of them are real."""
        return x[:, self.num_prefix:], None if valid is None else valid[:, self.num_prefix:]


class ClassTokenPool(nn.Module):
    """The class token's final state (ViT, BERT)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm: NormFactory, mlp: MlpFactory, num_prefix: int,
    ) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return x[:, 0]


@torch.fx.wrap
def token_grid(x: torch.Tensor, grid: tuple[int, int], cell: int, reader: str) -> tuple[int, int]:
    """The patch grid that the tokens ``x`` ``(b, h*w, d)`` lie on, for the readouts that read cells of it: the
    model's ``grid`` when they fill it, else the square grid of as many tokens (the model fed square images of
    another size, ``dynamic_img_size``). Refused when that grid is not whole ``cell x cell`` cells. Under
    ``torch.fx`` this is one graph node, as the token count is known only when the graph runs; under
    ``torch.jit.trace`` the side of a square grid is a traced value, so the trace reads any square size."""
    if torch.jit.is_tracing() and grid[0] == grid[1]:  # the count is a traced value: so is the side (any square)
        side = torch.as_tensor(x.shape[1]).float().sqrt().round().long()
        return side, side
    count = int(x.shape[1])
    if count == grid[0] * grid[1]:
        rows, cols = grid[0], grid[1]
    else:
        rows = cols = int(round(count**0.5))
        if rows * cols != count:
            raise ValueError(f"{reader} finds the patch grid from the number of tokens: {grid} at img_size, square "
                             f"at other sizes, but got {count} tokens; feed square images or images of img_size")
    require_cells((rows, cols), cell, reader)
    return rows, cols


def require_cells(grid: tuple[int, int], cell: int, reader: str) -> None:
    """Refuse an image's patch ``grid`` that is not whole ``cell x cell`` cells, for the readouts that read cells."""
    if grid[0] % cell or grid[1] % cell:
        raise ValueError(f"{reader} reads {cell}x{cell} cells, but the patch grid {tuple(grid)} is not divisible by "
                         f"the cell; use images whose side in patches is a multiple of {cell}")


def masked_mean(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over the tokens of ``(b, n, dim)`` that ``valid`` ``(b, n)`` marks (all when None)."""
    if valid is None:
        return reduce(x, "b n d -> b d", "mean")
    weights = rearrange(valid.to(x.dtype), "b n -> b n 1")
    return reduce(x * weights, "b n d -> b d", "sum") / reduce(weights, "b n 1 -> b 1", "sum").clamp(min=1)


def masked_max(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Channel-wise max over the tokens of ``(b, n, dim)`` that ``valid`` ``(b, n)`` marks (all when None)."""
    if valid is not None:
        x = x.masked_fill(~rearrange(valid, "b n -> b n 1"), torch.finfo(x.dtype).min)
    return reduce(x, "b n d -> b d", "max")


class AvgPool(_Readout):
    """Mean of the patch tokens, prefix tokens excluded (global average pooling, "GAP")."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return masked_mean(*self._read(x, valid))


class MaxPool(_Readout):
    """Channel-wise max over the patch tokens, prefix tokens excluded."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return masked_max(*self._read(x, valid))


class AvgMaxPool(_Readout):
    """Half the mean plus half the max of the patch tokens (timm's ``avgmax`` readout)."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        x, valid = self._read(x, valid)
        return 0.5 * (masked_mean(x, valid) + masked_max(x, valid))


class NoPool(_Readout):
    """Keep every token: ``(b, n, dim)`` goes to the head unpooled (dense prediction)."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return x


class AttentionPool(nn.Module):
    """Multi-head attention pooling with one learned query, then a residual MLP ("MAP").

    From "Scaling Vision Transformers" (Zhai et al. 2022), used by SigLIP; timm's
    ``AttentionPoolLatent`` parameter layout (``latent``, ``q``, ``kv``, ``proj``, ``norm``, ``mlp``).
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm: NormFactory, mlp: MlpFactory, num_prefix: int, *,
        options: AttentionPoolOptions = AttentionPoolOptions(),
    ) -> None:
        super().__init__()
        self.num_heads = options.num_heads or num_heads
        self.num_prefix = 0 if options.include_prefix else num_prefix
        self.latent = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, dim), std=dim**-0.5))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = norm(dim)
        self.mlp = mlp(dim, int(dim * (options.mlp_ratio or mlp_ratio)))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        x = x[:, self.num_prefix:]
        mask = None if valid is None else rearrange(valid[:, self.num_prefix:], "b n -> b 1 1 n")
        latent = repeat(self.latent, "1 l d -> b l d", b=x.shape[0])
        q = rearrange(self.q(latent), "b l (h e) -> b h l e", h=self.num_heads)
        k, v = rearrange(self.kv(x), "b n (kv h e) -> kv b h n e", kv=2, h=self.num_heads)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        pooled = self.proj(rearrange(attended, "b h l e -> b l (h e)"))
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]


def _pool_probe(module: nn.Module, args: tuple) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Prefix tokens plus four patch tokens must pool to one (b, dim) vector per image."""
    dim, num_prefix = args[0], args[5]
    return module(torch.randn(2, num_prefix + 4, dim, **like_module(module))), (2, dim)


POOLS: BlockTable = BlockTable(
    "pool", "factory(dim, num_heads, mlp_ratio, norm, mlp, num_prefix, *, options) -> module with forward(x, "
    "valid=None) (b, n, dim) -> (b, dim)",
    probe=_pool_probe,
)
POOLS.register("token", ClassTokenPool)
for _name, _pool in (("avg", AvgPool), ("max", MaxPool), ("avgmax", AvgMaxPool), ("none", NoPool)):
    POOLS.register(_name, _pool, options=PoolOptions)
POOLS.register("map", AttentionPool, options=AttentionPoolOptions)
POOLS.alias("gap", "avg")  # global average pooling, as papers and big_vision call it


def global_pool_change(name: str, options: BlockOptions | None, global_pool: str) -> str | dict[str, Any]:
    """The pool change that timm's ``global_pool`` name makes on a model whose pooling is the entry ``name`` with
    ``options`` (``create_model(global_pool=...)``, ``reset_classifier``): what the entry declares for timm's names
    (``timm_global_pools``: on the VLM towers ``''`` and ``'avg'`` are options of the readout, or drop the
    projector), else the entry of that name, ``''`` being none."""
    declared = getattr(POOLS.get(name), "timm_global_pools", None)
    change = None if declared is None else declared(options).get(global_pool)
    if change is not None:
        return change
    return "none" if global_pool == "" else global_pool


def with_global_pool(spec: ViTSpec, global_pool: str | None) -> ViTSpec:
    """``spec`` with timm's ``global_pool`` name applied as its pooling reads it (:func:`global_pool_change`);
    None: unchanged."""
    if global_pool is None:
        return spec
    return spec.replace(pool=global_pool_change(*spec.layer("pool"), global_pool))
