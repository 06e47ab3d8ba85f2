"""Attention slot.

Contract: ``factory(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop) -> nn.Module`` mapping
``(b, n, dim) -> (b, n, dim)``; ``qk_norm`` is a norm factory applied per head to q and k, or None.
Two keywords are passed only when a spec asks for them: ``proj_bias=False`` (no bias on the output
projection) and ``inner_norm`` (a norm factory applied before the output projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.table import BlockTable


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection on ``F.scaled_dot_product_attention``.

    ViT (Dosovitskiy et al. 2021); optional per-head q/k normalization from ViT-22B (Dehghani et al.
    2023); optional norm before the output projection (Sub-LN of BEiT-3 and Magneto, Wang et al.
    2022). ``qkv`` packs q, k, v as ``(3 * heads * head_dim, dim)``, timm's layout.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: NormFactory | None = None,
        attn_drop: float = 0.0, proj_drop: float = 0.0, *, proj_bias: bool = True,
        inner_norm: NormFactory | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = qk_norm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = qk_norm(head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.norm = inner_norm(dim) if inner_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(self.norm(rearrange(x, "b h n d -> b n (h d)"))))


ATTENTIONS: BlockTable = BlockTable(
    "attn", "factory(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop) -> module (b, n, dim) -> (b, n, dim)"
)
ATTENTIONS.register("mhsa", Attention)
