"""Windowed attention with decomposed relative positions: ViTDet's and Segment Anything's image encoder.

Registered in the attention slot as ``windowed``; its ``window`` option, one value per layer, mixes windowed
blocks with global ones (SAM ViT-B: ``window = [14, 14, 0, 14, 14, 0, ...]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from vitzoo.blocks.attention import ATTENTIONS, Attention, AttentionOptions
from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.options import GridOptions
from vitzoo.blocks.rope import Rotation
from vitzoo.fields import NON_NEGATIVE, described

torch.fx.wrap("rearrange")
torch.fx.wrap("einsum")


@dataclass(frozen=True)
class WindowOptions(GridOptions, AttentionOptions):
    """Options of windowed attention."""

    window: int = described(0, "side of the square windows tokens attend within (padded); 0: global attention over "
                               "the whole grid (SAM: 14, and 0 at its global blocks)", NON_NEGATIVE)
    rel_pos: bool = described(True, "decomposed relative positions: learned rel_pos_h / rel_pos_w tables of "
                                    "(2 * size - 1, head_dim), size the window's or, globally, the grid's")

    def check(self, spec) -> None:
        if spec.num_prefix_tokens:
            raise ValueError("windowed attention lays the tokens out on the patch grid, so it takes no class, "
                             "distillation or register tokens; pass class_token=False (and pool='avg')")
        if spec.attn_bias.name != "none":
            raise ValueError("windowed attention cannot add a bias laid out for the whole grid inside its windows; "
                             "use attn_bias='none' (rel_pos gives each attention its own relative positions)")
        if spec.dynamic_img_size:
            raise ValueError("windowed attention is built for the patch grid at img_size; use dynamic_img_size=False "
                             "and build the model at the image size you need (img_size=...)")


def relative_index(size: int) -> torch.Tensor:
    """``(size, size)`` rows of a ``(2 * size - 1)``-row table: ``q - k + size - 1`` for query q and key k."""
    coords = torch.arange(size)
    return rearrange(coords, "q -> q 1") - rearrange(coords, "k -> 1 k") + size - 1


def decomposed_bias(
    q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, size: tuple[int, int],
) -> torch.Tensor:
    """The attention bias of decomposed relative positions (MViTv2, Li et al. 2022): query ``(y, x)`` and key
    ``(y', x')`` get ``q . rel_h[y, y'] + q . rel_w[x, x']``. ``q`` is ``(b, heads, h * w, d)``, ``rel_h``
    ``(h, h, d)`` and ``rel_w`` ``(w, w, d)`` the tables read at each (query, key) pair -> ``(b, heads, n, n)``."""
    q = rearrange(q, "b n (y x) d -> b n y x d", y=size[0], x=size[1])
    rows = einsum(q, rel_h, "b n y x d, y ky d -> b n y x ky")
    cols = einsum(q, rel_w, "b n y x d, x kx d -> b n y x kx")
    bias = rearrange(rows, "b n y x ky -> b n y x ky 1") + rearrange(cols, "b n y x kx -> b n y x 1 kx")
    return rearrange(bias, "b n y x ky kx -> b n (y x) (ky kx)")


class WindowedAttention(Attention):
    """Multi-head attention within square windows of the patch grid (zero-padded to whole windows), or over
    the whole grid with ``window=0``, each with decomposed relative positions added to the logits: ViTDet's
    backbone (Li, Mao, Girshick, He 2022) and Segment Anything's image encoder (Kirillov et al. 2023; timm's
    ``VisionTransformerSAM``). Windows keep attention linear in the image area at 1024 px; the few global
    blocks propagate between windows. Padding tokens are attended to, as in SAM. ``rel_pos_h`` / ``rel_pos_w``
    are timm's tables; the (query, key) index into them is a buffer built once for the grid.
    """

    def __init__(
        self, dim: int, num_heads: int, norm: NormFactory, attn_drop: float = 0.0, proj_drop: float = 0.0,
        layer: int = 0, *, options: WindowOptions = WindowOptions(),
    ) -> None:
        if options.grid is None:
            raise ValueError("windowed attention needs the patch grid: build it in a model (which fills the "
                             "grid in) or set its grid option")
        super().__init__(dim, num_heads, norm, attn_drop, proj_drop, layer, options=options)
        self.grid, self.window = tuple(options.grid), options.window
        self.size = (self.window, self.window) if self.window else self.grid  # each attention's token grid
        self.rel_pos = options.rel_pos
        if options.rel_pos:
            head_dim = dim // num_heads
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * self.size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * self.size[1] - 1, head_dim))
            self.register_buffer("index_h", relative_index(self.size[0]), persistent=False)
            self.register_buffer("index_w", relative_index(self.size[1]), persistent=False)

    def _partition(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(b, h * w, d)`` -> one row per window ``(b * windows, window^2, d)`` (or the grid as it is)."""
        h, w = self.grid
        if not self.window:
            return x
        x = rearrange(x, "b (h w) d -> b h w d", h=h, w=w)
        s = self.window
        x = F.pad(x, (0, 0, 0, -w % s, 0, -h % s))
        return rearrange(x, "b (nh s1) (nw s2) d -> (b nh nw) (s1 s2) d", s1=s, s2=s)

    def _unpartition(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        h, w = self.grid
        if not self.window:
            return x
        s = self.window
        x = rearrange(x, "(b nh nw) (s1 s2) d -> b (nh s1) (nw s2) d", b=batch, nh=-(-h // s), s1=s, s2=s)
        return rearrange(x[:, :h, :w], "b h w d -> b (h w) d")

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if rotation is not None or mask is not None:
            raise ValueError("attn='windowed' takes neither rotary positions, a model-level attention bias nor patch "
                             "sequences; use rope='none', attn_bias='none' and image batches")
        batch = x.shape[0]
        q, k, v = rearrange(self.project(self._partition(x)), "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None
        if self.rel_pos:
            bias = decomposed_bias(q, self.rel_pos_h[self.index_h], self.rel_pos_w[self.index_w], self.size)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0)
        x = self.proj_drop(self.proj(self.norm(rearrange(x, "b h n d -> b n (h d)"))))
        return self._unpartition(x, batch)


ATTENTIONS.register("windowed", WindowedAttention, options=WindowOptions)
