"""The blocks of XCiT, Cross-Covariance Image Transformers (El-Nouby et al. 2021; timm's ``Xcit``).

- ``attn = "xca"``: cross-covariance attention, softmax over channel-by-channel similarities, linear in tokens;
- ``block = "xcit"``: attention, local patch interaction (two depthwise 3x3 convs over the patch grid) and MLP,
  each with its own LayerScale;
- ``patch_embed = "conv_bn"``: a stack of stride-2 3x3 conv + BatchNorm layers;
- ``pos_embed = "fourier"``: sine-cosine features of the normalized grid coordinates, projected by a 1x1 conv;
- ``prefix_join = "xcit_class_attn"``: XCiT's class-attention layers after the blocks (CaiT's, with XCiT's
  order of norms and names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from vitzoo.blocks.attention import ATTENTIONS, Attention, AttentionOptions
from vitzoo.blocks.encoder import ENCODER_BLOCKS, DropPath, LayerScaleOptions
from vitzoo.blocks.join import JOINS, ClassAttention, ClassAttentionOptions, MlpFactory
from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.options import GridOptions
from vitzoo.blocks.patch import PATCH_EMBEDS
from vitzoo.blocks.position import POSITIONS, PositionOptions
from vitzoo.blocks.rope import Rotation
from vitzoo.fields import AT_LEAST_ONE, POSITIVE, described

torch.fx.wrap("rearrange")
torch.fx.wrap("repeat")


class CrossCovarianceAttention(Attention):
    """XCA: each head's channels attend to each other through the softmax of the (channels x channels)
    cross-covariance of L2-normalized keys and queries, scaled by a learned per-head ``temperature`` (XCiT,
    El-Nouby et al. 2021). Cost grows linearly with the number of tokens; stored as timm's ``XCA``."""

    def _make_projections(self, dim: int, options: AttentionOptions) -> None:
        super()._make_projections(dim, options)
        self.temperature = nn.Parameter(torch.ones(self.num_heads, 1, 1))

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if rotation is not None or mask is not None:
            raise ValueError("attn='xca' mixes channels over all tokens at once: it takes neither rotary positions "
                             "(use rope='none') nor patch sequences (feed images)")
        q, k, v = rearrange(self.qkv(x), "b n (qkv h d) -> qkv b h d n", qkv=3, h=self.num_heads)
        # a (head_dim x head_dim) map per head: an explicit softmax is faster than SDPA at this size (7% on CPU)
        weights = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * self.temperature).softmax(-1)
        x = F.dropout(weights, self.attn_drop, self.training) @ v
        return self.proj_drop(self.proj(self.norm(rearrange(x, "b h d n -> b n (h d)"))))


@dataclass(frozen=True)
class XcitBlockOptions(LayerScaleOptions, GridOptions):
    """Options of the XCiT block: its LayerScale and the patch grid its convolutions see."""

    kernel: int = described(3, "side of the depthwise convolutions of the local patch interaction", AT_LEAST_ONE)


class LocalPatchInteraction(nn.Module):
    """Two depthwise convolutions over the patch grid with GELU and BatchNorm between them: the explicit
    exchange between neighbouring patches that XCA, mixing channels, lacks (XCiT's LPI)."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens ``(b, prefix + h * w, dim)``, the patch grid last -> the same shape, zero for prefix tokens (XCiT's
        class token joins after these blocks; in another model a class token in front is passed over)."""
        prefix = x.shape[1] - grid[0] * grid[1]
        patches = rearrange(x[:, prefix:], "b (h w) d -> b d h w", h=grid[0], w=grid[1])
        out = rearrange(self.conv2(self.bn(self.act(self.conv1(patches)))), "b d h w -> b (h w) d")
        return F.pad(out, (0, 0, prefix, 0))


class XcitBlock(nn.Module):
    """x + attn(norm(x)), x + lpi(norm(x)), x + mlp(norm(x)), each branch scaled by its own LayerScale
    (``gamma1``, ``gamma3``, ``gamma2``): XCiT's block (timm's ``XCABlock``). The local patch interaction reads the
    last tokens as the patch grid the options name; XCiT's class token joins after these blocks."""

    def __init__(
        self, dim: int, attn: nn.Module, mlp: nn.Module, norm: NormFactory, drop_path: float = 0.0, *,
        options: XcitBlockOptions = XcitBlockOptions(),
    ) -> None:
        super().__init__()
        self.grid = options.grid
        self.norm1, self.attn = norm(dim), attn
        self.norm3, self.local_mp = norm(dim), LocalPatchInteraction(dim, options.kernel)
        self.norm2, self.mlp = norm(dim), mlp
        scale = options.layer_scale
        for name in ("gamma1", "gamma3", "gamma2"):
            setattr(self, name, nn.Parameter(torch.full((dim,), float(scale))) if scale else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(_scaled(self.attn(self.norm1(x), rotation, mask), self.gamma1))
        x = x + self.drop_path(_scaled(self.local_mp(self.norm3(x), self.grid), self.gamma3))
        return x + self.drop_path(_scaled(self.mlp(self.norm2(x)), self.gamma2))


def _scaled(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    return x if gamma is None else x * gamma


class ConvBnPatchEmbed(nn.Module):
    """Patches from log2(patch_size) stride-2 3x3 convolutions, each followed by BatchNorm, GELU between them,
    the width doubling up to ``dim`` (XCiT's ``ConvPatchEmbed``; the convolutional stem of Xiao et al. 2021).
    Stored as ``proj.<2i>.0`` (conv) and ``proj.<2i>.1`` (BatchNorm)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, norm: NormFactory) -> None:
        super().__init__()
        layers = int(math.log2(patch_size))
        if 2 ** layers != patch_size or dim % 2 ** (layers - 1):
            raise ValueError(f"patch_embed='conv_bn' halves the image {layers} times with widths dim / 2^k: it needs "
                             f"patch_size a power of two (got {patch_size}) and embed_dim divisible by "
                             f"{2 ** max(layers - 1, 0)} (got {dim})")
        widths = [in_chans] + [dim // 2 ** (layers - 1 - i) for i in range(layers)]
        modules: list[nn.Module] = []
        for i in range(layers):
            if i:
                modules.append(nn.GELU())
            modules.append(nn.Sequential(
                nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[i + 1])))
        self.proj = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d h w -> b h w d")


@dataclass(frozen=True)
class FourierOptions(PositionOptions):
    """Options of the Fourier position encoding."""

    prefix: bool = described(False, "must stay False: prefix tokens have no grid position")
    features: int = described(32, "sine-cosine features per axis before the projection", AT_LEAST_ONE)
    temperature: float = described(10000.0, "frequency base of the sines and cosines", POSITIVE)


class FourierPosition(nn.Module):
    state_name = "pos_embed"  # timm's key of the module: pos_embed.token_projection.weight

    """Sine-cosine features of each patch's row and column (counted from 1, scaled to (0, 2 pi]) projected to
    the token width by a learned 1x1 convolution ``token_projection`` (XCiT's ``PositionalEncodingFourier``,
    after DETR). Any grid works; the patch tokens only get it (``prefix`` must be False)."""

    def __init__(self, grid_size: tuple[int, int], dim: int, num_prefix: int, *,
                 options: FourierOptions = FourierOptions()) -> None:
        super().__init__()
        if options.prefix and num_prefix:
            raise ValueError("pos_embed='fourier' encodes grid positions, which prefix tokens do not have; "
                             "set pos_embed={'prefix': False}")
        self.features, self.temperature = options.features, options.temperature
        self.token_projection = nn.Conv2d(2 * options.features, dim, kernel_size=1)

    def init_table(self) -> None:
        return None

    def forward(self, table: None, grid: tuple[int, int]) -> torch.Tensor:
        weight = self.token_projection.weight
        rows, cols = (torch.arange(1, n + 1, device=weight.device, dtype=torch.float32) for n in grid)
        rows, cols = (t / (t[-1] + 1e-6) * (2 * math.pi) for t in (rows, cols))
        freqs = self.temperature ** (2 * (torch.arange(self.features, device=weight.device) // 2) / self.features)
        angles = [rearrange(t, "n -> n 1") / freqs for t in (rows, cols)]
        y, x = (rearrange(torch.stack([a[:, 0::2].sin(), a[:, 1::2].cos()], dim=-1), "n f two -> n (f two)")
                for a in angles)
        features = torch.cat([repeat(y, "h f -> h w f", w=grid[1]), repeat(x, "w f -> h w f", h=grid[0])], dim=-1)
        pos = F.conv2d(rearrange(features, "h w f -> 1 f h w").to(weight.dtype), weight, self.token_projection.bias)
        return rearrange(pos, "1 d h w -> 1 (h w) d")


@dataclass(frozen=True)
class XcitClassAttentionOptions(ClassAttentionOptions):
    """Options of XCiT's class-attention layers."""

    tokens_norm: bool = described(
        False, "the second norm normalizes every token, not only the class token (XCiT's tokens_norm)")


class XcitClassAttentionBlock(nn.Module):
    """One XCiT class-attention layer (timm's ``ClassAttentionBlock`` of XCiT): the class token attends to all
    tokens; unlike CaiT's, the residual adds the first norm's output to the patch tokens too, and the second norm
    applies to the class token (every token with ``tokens_norm``) before the class token's MLP, whose residual
    covers the whole sequence, so the patch tokens are added to themselves (the official code's, kept for its
    weights). LayerScale as ``gamma1`` / ``gamma2``."""

    def __init__(
        self, dim: int, attn: ClassAttention, mlp: nn.Module, norm: NormFactory, tokens_norm: bool,
        layer_scale: float | None,
    ) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm(dim), attn, norm(dim), mlp
        self.tokens_norm = tokens_norm
        self.gamma1, self.gamma2 = (nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale else None
                                    for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        queries = self.attn.num_queries
        x = x + _scaled(torch.cat([self.attn(normed), normed[:, queries:]], dim=1), self.gamma1)
        x = self.norm2(x) if self.tokens_norm else torch.cat([self.norm2(x[:, :queries]), x[:, queries:]], dim=1)
        prefix = x[:, :queries] + _scaled(self.mlp(x[:, :queries]), self.gamma2)
        return torch.cat([prefix, 2 * x[:, queries:]], dim=1)  # the MLP's residual spans the patch tokens too


class XcitClassAttentionStage(nn.ModuleList):
    """XCiT's class-attention stage: the class token joins after the XCiT blocks, and ``depth``
    :class:`XcitClassAttentionBlock` update it (and, by their residual, the patch tokens). Stored as timm's
    ``cls_attn_blocks.N``."""

    stored_as = "cls_attn_blocks"

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm: NormFactory, mlp: MlpFactory, num_prefix: int, *,
        options: XcitClassAttentionOptions = XcitClassAttentionOptions(),
    ) -> None:
        hidden = int(dim * (options.mlp_ratio or mlp_ratio))
        super().__init__(
            XcitClassAttentionBlock(dim, ClassAttention(dim, num_heads, num_prefix, options.qkv_bias),
                                    mlp(dim, hidden), norm, options.tokens_norm, options.layer_scale)
            for _ in range(options.depth)
        )

    def forward(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        x = torch.cat([prefix, x], dim=1)
        for block in self:
            x = block(x)
        return x


ATTENTIONS.register("xca", CrossCovarianceAttention, options=AttentionOptions)
ENCODER_BLOCKS.register("xcit", XcitBlock, options=XcitBlockOptions)
PATCH_EMBEDS.register("conv_bn", ConvBnPatchEmbed)
POSITIONS.register("fourier", FourierPosition, options=FourierOptions)
JOINS.register("xcit_class_attn", XcitClassAttentionStage, options=XcitClassAttentionOptions)
