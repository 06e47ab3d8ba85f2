"""Attention entries whose attention map is more than one softmax of q·k: talking heads (CaiT) and gated
positional self-attention (ConViT). Both follow the attention slot's contract (:mod:`vitzoo.blocks.attention`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import nn

from vitzoo.blocks.attention import ATTENTIONS, Attention, AttentionOptions, attend_heads
from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.options import GridOptions
from vitzoo.blocks.rope import Rotation, rotate

# torch.fx symbolic tracing keeps the einops calls as graph nodes: einops needs real tensors and shapes
torch.fx.wrap("rearrange")
torch.fx.wrap("repeat")
torch.fx.wrap("einsum")
DEFAULTS = AttentionOptions()


def mix_heads(scores: torch.Tensor, mix: nn.Linear) -> torch.Tensor:
    """``(b, heads, n, m)`` scores -> ``(b, heads, n, m)``: each output head a learned combination of all heads
    (the linear map over heads runs on a heads-last view, bias fused, as timm runs it)."""
    return rearrange(mix(rearrange(scores, "b h n m -> b n m h")), "b n m g -> b g n m")


class TalkingHeadsAttention(Attention):
    """Talking-heads attention (Shazeer et al. 2020), as CaiT uses it (Touvron et al. 2021; timm's
    ``TalkingHeadAttn``): the heads' attention logits are mixed by ``proj_l`` before the softmax and the
    probabilities by ``proj_w`` after it, two ``heads x heads`` linear maps. The softmax between the two mixes
    rules out ``F.scaled_dot_product_attention``; the scores are formed with einsum. ``qkv`` as in ``mhsa``.
    """

    def __init__(
        self, dim: int, num_heads: int, norm: NormFactory, attn_drop: float = 0.0, proj_drop: float = 0.0,
        layer: int = 0, *, options: AttentionOptions = DEFAULTS,
    ) -> None:
        super().__init__(dim, num_heads, norm, attn_drop, proj_drop, layer, options=options)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)
        self.scale = (dim // num_heads) ** -0.5

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.project(x), "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if rotation is not None:
            q, k = rotate(q, rotation), rotate(k, rotation)
        scores = mix_heads((q * self.scale) @ rearrange(k, "b h m d -> b h d m"), self.proj_l)
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf)
        weights = mix_heads(scores.softmax(dim=-1), self.proj_w)
        weights = F.dropout(weights, self.attn_drop, self.training)
        x = rearrange(weights @ v, "b h n d -> b n (h d)")
        return self.proj_drop(self.proj(self.norm(x)))


@dataclass(frozen=True)
class GatedPositionalOptions(AttentionOptions, GridOptions):
    """Options of gated positional self-attention."""

    def check(self, spec) -> None:
        if spec.dynamic_img_size:
            raise ValueError("gpsa's positional attention is laid out for the patch grid at img_size; "
                             "use dynamic_img_size=False")
        names = spec.attn.name if isinstance(spec.attn.name, tuple) else (spec.attn.name,) * spec.depth
        last = max(i for i, name in enumerate(names) if name == "gpsa")
        if spec.num_prefix_tokens and spec.join_at <= last:
            raise ValueError(f"gpsa attends over the patch grid only, but the prefix tokens join before block "
                             f"{spec.join_at} and gpsa runs up to block {last}; set prefix_join={{'at': {last + 1}}} "
                             f"(ConViT), or class_token=False with pool='avg'")


def relative_offsets(grid: tuple[int, int]) -> torch.Tensor:
    """``(n, n, 3)`` for the ``n = h * w`` cells of ``grid`` (row-major): per (query, key) the key's column and
    row offsets from the query and their squared distance, ConViT's ``rel_indices``."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    cells = torch.stack([cols.flatten(), rows.flatten()], dim=-1).float()  # (n, 2): x, y
    offsets = rearrange(cells, "m c -> 1 m c") - rearrange(cells, "n c -> n 1 c")
    return torch.cat([offsets, offsets.square().sum(-1, keepdim=True)], dim=-1)


class GatedPositionalAttention(Attention):
    """Gated positional self-attention, GPSA (ConViT, d'Ascoli et al. 2021; timm's ``GPSA``): per head, a
    learned gate ``sigmoid(gating_param)`` blends content attention (softmax of q·k, through
    ``F.scaled_dot_product_attention``) with positional attention, a softmax over keys of ``pos_proj`` applied to
    each (query, key) pair's relative offsets on the patch grid. The offsets are a buffer made once for the grid,
    and the positional map is computed once per forward for the whole batch. Initialized as a convolution
    (:meth:`init_block_weights`, timm's ``local_init`` with locality strength 1). Stored as ``qk`` (q and k packed, no
    separate bias for k), ``v``, ``pos_proj`` (3 -> heads), ``gating_param``, ``proj``.
    """

    def __init__(
        self, dim: int, num_heads: int, norm: NormFactory, attn_drop: float = 0.0, proj_drop: float = 0.0,
        layer: int = 0, *, options: GatedPositionalOptions = GatedPositionalOptions(grid=(14, 14)),
    ) -> None:
        super().__init__(dim, num_heads, norm, attn_drop, proj_drop, layer, options=options)
        self.pos_proj = nn.Linear(3, num_heads)
        self.gating_param = nn.Parameter(torch.ones(num_heads))
        self.register_buffer("rel_indices", relative_offsets(options.grid), persistent=False)

    def _make_projections(self, dim: int, options: AttentionOptions) -> None:
        self.qk = nn.Linear(dim, 2 * dim, bias=options.qkv_bias)
        self.v = nn.Linear(dim, dim, bias=options.qkv_bias)

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise ValueError("gpsa attends over one image's patch grid; feed it images, not patch sequences")
        q, k = rearrange(self.qk(x), "b n (qk h d) -> qk b h n d", qk=2, h=self.num_heads)
        v = rearrange(self.v(x), "b n (h d) -> b h n d", h=self.num_heads)
        dropout = self.attn_drop if self.training else 0.0
        content = attend_heads(q, k, v, self.q_norm, self.k_norm, dropout, rotation)
        positional = self.pos_proj(self.rel_indices.to(x.dtype)).softmax(dim=1)  # (n, m, h): over keys m
        positional = F.dropout(positional, dropout, self.training)
        positional = rearrange(einsum(positional, v, "n m h, b h m d -> b h n d"), "b h n d -> b n (h d)")
        gate = repeat(torch.sigmoid(self.gating_param), "h -> (h d)", d=v.shape[-1])
        x = (1.0 - gate) * content + gate * positional
        return self.proj_drop(self.proj(self.norm(x)))

    @torch.no_grad()
    def init_block_weights(self) -> None:
        """Start as a convolution (timm's ``local_init``): ``v`` the identity, and the first ``k * k`` heads
        (``k = int(sqrt(heads))``) each attending around one offset of a ``k x k`` kernel."""
        self.v.weight.copy_(torch.eye(self.v.weight.shape[0]))
        kernel = int(self.num_heads**0.5)
        center = (kernel - 1) / 2 if kernel % 2 == 0 else kernel // 2
        for h1 in range(kernel):
            for h2 in range(kernel):
                self.pos_proj.weight[h1 + kernel * h2] = torch.tensor([2 * (h2 - center), 2 * (h1 - center), -1.0])


ATTENTIONS.register("talking_heads", TalkingHeadsAttention, options=AttentionOptions)
ATTENTIONS.register("gpsa", GatedPositionalAttention, options=GatedPositionalOptions)
