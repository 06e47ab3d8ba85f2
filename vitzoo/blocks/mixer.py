"""All-MLP token mixing: MLP-Mixer, gMixer, ResMLP and gMLP blocks (timm's ``MlpMixer`` family).

"Attention swapped for an MLP" is a slot swap here: the token mixers are entries of the ``attn`` slot
(``token_mlp``, ``token_glu``, ``token_linear``, and ``none`` for no token mixing at all), so any model can use
them (``attn="token_mlp"``). They are laid out for one token count, the model's patch grid plus its prefix tokens
(:class:`TokenOptions`), so they refuse rotary positions, a dynamic image size, patch dropout and patch
sequences. The ``mixer``, ``resmlp`` and ``gmlp`` encoder blocks wire them as timm does and store their parts
under timm's names (``mlp_tokens``, ``linear_tokens``, ``mlp_channels``); ``affine`` is ResMLP's norm and
``spatial_gating`` gMLP's MLP, whose gate mixes tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

from vitzoo.blocks.attention import ATTENTIONS
from vitzoo.blocks.encoder import ENCODER_BLOCKS, DropPath, LayerScaleOptions
from vitzoo.blocks.mlp import MLPS, Mlp, PackedGatedMlp, PackedGluOptions
from vitzoo.blocks.norm import NORMS, NormFactory
from vitzoo.blocks.options import GridOptions
from vitzoo.blocks.rope import Rotation
from vitzoo.fields import NON_NEGATIVE, POSITIVE, described

# torch.fx symbolic tracing keeps the einops calls as graph nodes: einops needs real tensors and shapes
torch.fx.wrap("rearrange")
NO_LAYER_SCALE = LayerScaleOptions()


@dataclass(frozen=True)
class TokenOptions(GridOptions):
    """Options of a block with weights across tokens: sized for the patch grid and the prefix tokens in front."""

    prefix: int | None = described(
        None, "class/register tokens in front of the patches, mixed with them; None: the model's", NON_NEGATIVE)

    def for_model(self, spec: Any) -> TokenOptions:
        options = super().for_model(spec)
        return options if options.prefix is not None else dataclasses.replace(options, prefix=spec.num_prefix_tokens)

    def check(self, spec: Any) -> None:
        count = "is sized for one token count (the patch grid at img_size and the prefix tokens)"
        for wrong, problem, fix in (
            (spec.rope.name != "none", "has no queries or keys to rotate", "use rope='none'"),
            (spec.dynamic_img_size, f"{count}, so it takes neither other image sizes nor patch sequences",
             "use dynamic_img_size=False and image batches of img_size"),
            (spec.drop.patch > 0, f"{count}, which patch dropout changes", "use drop.patch=0"),
        ):
            if wrong:
                raise ValueError(f"a block mixing tokens with weights across them {problem}; {fix}")
        grid = spec.grid_size
        if self.tokens != grid[0] * grid[1] + spec.num_prefix_tokens:
            raise ValueError(f"grid={self.grid} and prefix={self.prefix} give {self.tokens} tokens, but the model has "
                             f"{grid[0]} x {grid[1]} patches and {spec.num_prefix_tokens} prefix tokens; leave grid "
                             f"and prefix unset (None) to follow the model")

    @property
    def tokens(self) -> int:
        """The token count the block mixes: patches of the grid plus prefix tokens."""
        if self.grid is None or self.prefix is None:
            raise ValueError("a token-mixing block needs the token count: build it in a model, or set grid and prefix")
        return self.grid[0] * self.grid[1] + self.prefix

    def params(self, dim: int) -> float:
        """About how many parameters the block has across tokens (:mod:`vitzoo.size`): one tokens x tokens layer."""
        n = float(self.tokens)
        return n * n + n


@dataclass(frozen=True)
class TokenMlpOptions(TokenOptions):
    """Options of the token-mixing MLPs."""

    ratio: float = described(0.5, "hidden width / embed_dim (timm's mlp_ratio[0]: Mixer 0.5, gMixer 1.0)", POSITIVE)

    def check(self, spec: Any) -> None:
        super().check(spec)
        if int(spec.embed_dim * self.ratio) < 2:
            raise ValueError(f"ratio={self.ratio} gives a hidden width int({spec.embed_dim} * {self.ratio}) under 2; "
                             f"use at least 2 / embed_dim")

    def params(self, dim: int) -> float:
        n, hidden = float(self.tokens), dim * self.ratio
        return 2 * n * hidden + hidden + n


class AcrossTokens:
    """Mixin: the module applied along the token axis, ``(b, n, d) -> (b, d, n) -> module -> (b, n, d)``, with the
    attention slot's ``forward(x, rotation, mask=None)``. Rotary positions are refused when the spec is checked."""

    def forward(
        self, x: torch.Tensor, rotation: Rotation | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if mask is not None:
            raise ValueError("a token-mixing MLP is sized for one token count and cannot take patch sequences; "
                             "feed it images")
        return rearrange(super().forward(rearrange(x, "b n d -> b d n")), "b d n -> b n d")


class TokenMlp(AcrossTokens, Mlp):
    """fc1 -> GELU -> fc2 across tokens: the token-mixing MLP of MLP-Mixer (Tolstikhin et al. 2021; timm's
    ``MixerBlock.mlp_tokens``)."""


class TokenGlu(AcrossTokens, PackedGatedMlp):
    """A packed gated MLP across tokens, value half * SiLU(gate half): gMixer's token mixing (Ross Wightman's SwiGLU
    experiment on MLP-Mixer; timm's ``GluMlp``)."""


class TokenLinear(AcrossTokens, nn.Linear):
    """One linear layer across tokens: ResMLP's token mixing (Touvron et al. 2021; timm's ``linear_tokens``), and
    the projection of gMLP's spatial gating unit."""


def token_mlp(dim: int, num_heads: int, norm: NormFactory, attn_drop: float = 0.0, proj_drop: float = 0.0,
              layer: int = 0, *, options: TokenMlpOptions = TokenMlpOptions()) -> TokenMlp:
    """The ``token_mlp`` attention entry: :class:`TokenMlp` of hidden width ``ratio * dim`` (MLP-Mixer)."""
    return TokenMlp(options.tokens, int(dim * options.ratio), norm, proj_drop)


def token_glu(dim: int, num_heads: int, norm: NormFactory, attn_drop: float = 0.0, proj_drop: float = 0.0,
              layer: int = 0, *, options: TokenMlpOptions = TokenMlpOptions()) -> TokenGlu:
    """The ``token_glu`` attention entry: :class:`TokenGlu` of hidden width ``ratio * dim`` (gMixer)."""
    hidden = int(dim * options.ratio)
    if hidden % 2:
        raise ValueError(f"the hidden width int({dim} * ratio={options.ratio}) = {hidden} is odd, and value and gate "
                         f"are its two halves; pick attn.ratio so that it is even")
    return TokenGlu(options.tokens, hidden, norm, proj_drop, act=nn.SiLU,
                    options=PackedGluOptions(gate_last=True))


def token_linear(dim: int, num_heads: int, norm: NormFactory, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 layer: int = 0, *, options: TokenOptions = TokenOptions()) -> TokenLinear:
    """The ``token_linear`` attention entry: :class:`TokenLinear`, tokens -> tokens (ResMLP)."""
    return TokenLinear(options.tokens, options.tokens)


class NoTokenMixing(nn.Module):
    """No attention: the branch adds nothing. gMLP (Liu et al. 2021) mixes tokens inside its MLP
    (``spatial_gating``) and its ``gmlp`` block has no attention branch; in other blocks this is the ablation
    "channel MLPs only"."""

    def __init__(self, dim: int, num_heads: int, norm: NormFactory, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 layer: int = 0) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros_like(x)


class Affine(nn.Module):
    """``alpha * x + beta`` per channel, stored as ``(1, 1, dim)``: ResMLP's replacement for LayerNorm (Touvron et
    al. 2021; timm's ``Affine``). It takes no statistics, so it has no eps."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, self.alpha, x)


class SpatialGatingUnit(nn.Module):
    """Half the hidden channels gate the other half after a LayerNorm and a linear layer across tokens (gMLP, Liu
    et al. 2021; timm's ``SpatialGatingUnit``, whose norm is a LayerNorm with eps 1e-5 whatever the model's norm).
    The projection starts at weight ~0, bias 1, so the unit starts as the identity on its first half."""

    def __init__(self, hidden_dim: int, tokens: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim // 2)
        self.proj = TokenLinear(tokens, tokens)

    def init_weights(self) -> None:
        nn.init.normal_(self.proj.weight, std=1e-6)
        nn.init.ones_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = rearrange(x, "b n (two e) -> two b n e", two=2)
        return u * self.proj(self.norm(v))


class SpatialGatingMlp(nn.Module):
    """fc1 -> GELU -> spatial gating -> fc2 from half the hidden width: gMLP's only sublayer (Liu et al. 2021, "Pay
    Attention to MLPs"; timm's ``GatedMlp`` with a ``SpatialGatingUnit``), an MLP that also mixes tokens."""

    def __init__(self, dim: int, hidden_dim: int, norm: NormFactory, drop: float = 0.0, *,
                 options: TokenOptions = TokenOptions()) -> None:
        super().__init__()
        if hidden_dim % 2:
            raise ValueError(f"spatial gating splits the hidden width in two halves; {hidden_dim} is odd, pick "
                             f"mlp_ratio so that int(embed_dim * mlp_ratio) is even")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.gate = SpatialGatingUnit(hidden_dim, options.tokens)
        self.fc2 = nn.Linear(hidden_dim // 2, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.gate(self.drop1(self.act(self.fc1(x))))))


class MixerBlock(nn.Module):
    """x + mlp_tokens(norm1(x)), then x + mlp_channels(norm2(x)): MLP-Mixer's block (Tolstikhin et al. 2021;
    timm's ``MixerBlock``): the pre-norm block under timm's names, the attention slot's module mixing tokens
    (``token_mlp``, gMixer's ``token_glu``) and the MLP slot's mixing channels."""

    def __init__(self, dim: int, attn: nn.Module, mlp: nn.Module, norm: NormFactory, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = norm(dim)
        self.mlp_tokens = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp_channels = mlp

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x), rotation, mask))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class ResMlpBlock(nn.Module):
    """x + ls1 * linear_tokens(norm1(x)), then x + ls2 * mlp_channels(norm2(x)): ResMLP's block (Touvron et al.
    2021; timm's ``ResBlock``), with its LayerScale stored as bare ``ls1`` / ``ls2`` parameters (none when
    ``layer_scale`` is None). Its token mixer is the attention slot's (``token_linear``), its norm ``affine``."""

    def __init__(self, dim: int, attn: nn.Module, mlp: nn.Module, norm: NormFactory, drop_path: float = 0.0, *,
                 options: LayerScaleOptions = NO_LAYER_SCALE) -> None:
        super().__init__()
        scale = options.layer_scale
        self.norm1 = norm(dim)
        self.linear_tokens = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp_channels = mlp
        self.ls1 = nn.Parameter(torch.full((dim,), float(scale))) if scale else None
        self.ls2 = nn.Parameter(torch.full((dim,), float(scale))) if scale else None

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(_scaled(self.linear_tokens(self.norm1(x), rotation, mask), self.ls1))
        return x + self.drop_path(_scaled(self.mlp_channels(self.norm2(x)), self.ls2))


def _scaled(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    return x if gamma is None else x * gamma


class GatedMlpBlock(nn.Module):
    """x + mlp_channels(norm(x)): gMLP's block (Liu et al. 2021; timm's ``SpatialGatingBlock``), one residual
    branch whose MLP (``spatial_gating``) mixes tokens too. It has no attention branch, so it takes the ``none``
    attention only: the spec says ``attn = "none"`` rather than a setting being silently ignored."""

    def __init__(self, dim: int, attn: nn.Module, mlp: nn.Module, norm: NormFactory, drop_path: float = 0.0) -> None:
        super().__init__()
        if not isinstance(attn, NoTokenMixing):
            raise ValueError(f"block='gmlp' has no attention branch (its MLP mixes tokens), got {type(attn).__name__}; "
                             f"set attn='none' (and mlp='spatial_gating' for gMLP)")
        self.norm = norm(dim)
        self.mlp_channels = mlp
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.drop_path(self.mlp_channels(self.norm(x)))


ATTENTIONS.register("token_mlp", token_mlp, options=TokenMlpOptions)
ATTENTIONS.register("token_glu", token_glu, options=TokenMlpOptions)
ATTENTIONS.register("token_linear", token_linear, options=TokenOptions)
ATTENTIONS.register("none", NoTokenMixing)
MLPS.register("spatial_gating", SpatialGatingMlp, options=TokenOptions)
NORMS.register("affine", Affine)
ENCODER_BLOCKS.register("mixer", MixerBlock)
ENCODER_BLOCKS.register("resmlp", ResMlpBlock, options=LayerScaleOptions)
ENCODER_BLOCKS.register("gmlp", GatedMlpBlock)
