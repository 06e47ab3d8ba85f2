"""Attention slot.

Contract: ``factory(dim, num_heads, norm, attn_drop, proj_drop, layer, *, options) -> nn.Module`` with
``forward(x, rotation, mask=None)`` mapping ``(b, n, dim) -> (b, n, dim)``; ``norm`` is the model's norm factory
(for q/k and inner norms), ``layer`` the index of the block it serves, ``rotation`` the rotary positions
to turn q and k by (:class:`~vitzoo.blocks.rope.Rotation`), None for a model without RoPE, and ``mask`` which
keys each query may attend to, bool ``(b, 1, n, n)`` (None: all; patch sequences, :mod:`vitzoo.packing`), or a
float bias ``(1, heads, n, n)`` to add to the logits (the model's ``attn_bias``, :mod:`vitzoo.blocks.attn_bias`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.options import BlockOptions
from vitzoo.blocks.rope import Rotation, rotate
from vitzoo.blocks.table import BlockTable, like_module
from vitzoo.fields import AT_LEAST_ONE, described

# torch.fx symbolic tracing keeps the einops calls as graph nodes: einops needs real tensors and shapes
torch.fx.wrap("rearrange")
torch.fx.wrap("repeat")


@dataclass(frozen=True)
class AttentionOptions(BlockOptions):
    """Options of every attention entry."""

    qkv_bias: bool = described(True, "biases on the q, k, v projections")
    qk_norm: bool = described(False, "normalize q and k per head with the model's norm (ViT-22B)")
    proj_bias: bool = described(True, "bias on the output projection (AIMv2 has none)")
    inner_norm: bool = described(False, "norm before the output projection (Sub-LN of BEiT-3; EVA-02 CLIP)")


@dataclass(frozen=True)
class GroupedQueryOptions(AttentionOptions):
    """Options of grouped-query attention."""

    kv_heads: int | None = described(
        None, "key/value heads, each shared by num_heads / kv_heads query heads; None: num_heads", AT_LEAST_ONE)

    def check(self, spec) -> None:
        if self.kv_heads is not None and spec.num_heads % self.kv_heads:
            raise ValueError(f"kv_heads={self.kv_heads} does not divide num_heads={spec.num_heads}; each query "
                             f"group needs the same number of heads, so use a divisor of {spec.num_heads}")


def attend(
    qkv: torch.Tensor, num_heads: int, q_norm: nn.Module, k_norm: nn.Module, dropout: float = 0.0,
    rotation: Rotation | None = None, mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed q, k, v ``(b, n, 3 * heads * head_dim)`` -> attended values ``(b, n, heads * head_dim)``.
    Shared by every block that packs qkv."""
    q, k, v = rearrange(qkv, "b n (qkv h d) -> qkv b h n d", qkv=3, h=num_heads)
    return attend_heads(q, k, v, q_norm, k_norm, dropout, rotation, mask=mask)


def attend_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module, dropout: float = 0.0,
    rotation: Rotation | None = None, groups: int = 1, mask: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """Per-head q ``(b, h, n, d)`` and k, v ``(b, h / groups, n, d)`` -> ``(b, n, h * d)``: q/k norm, rotary
    positions, each key/value head shared by ``groups`` query heads (all of them once rotated, as
    grouped-query attention stores them), then ``F.scaled_dot_product_attention``. ``groups`` comes from the
    block's configuration, not from the shapes, so the branch is static for ``torch.fx``. ``scale`` multiplies the
    logits (None: ``head_dim ** -0.5``)."""
    q, k = q_norm(q), k_norm(k)
    if rotation is not None:
        q, k = rotate(q, rotation), rotate(k, rotation)
    if groups > 1:
        k, v = (repeat(t, "b h n d -> b (h g) n d", g=groups) for t in (k, v))
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    return rearrange(x, "b h n d -> b n (h d)")


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection on ``F.scaled_dot_product_attention``.

    ViT (Dosovitskiy et al. 2021); optional per-head q/k normalization from ViT-22B (Dehghani et al.
    2023); optional norm before the output projection (Sub-LN of BEiT-3 and Magneto, Wang et al.
    2022). ``qkv`` packs q, k, v as ``(3 * heads * head_dim, dim)``, timm's layout.
    """

    def __init__(
        self, dim: int, num_heads: int, norm: NormFactory, attn_drop: float = 0.0, proj_drop: float = 0.0,
        layer: int = 0, *, options: AttentionOptions = AttentionOptions(),
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self._make_projections(dim, options)
        self._make_qk_norms(dim // num_heads, norm, options.qk_norm)
        self.attn_drop = attn_drop
        self.norm = norm(dim) if options.inner_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=options.proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _make_qk_norms(self, head_dim: int, norm: NormFactory, qk_norm: bool) -> None:
        self.q_norm = norm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(head_dim) if qk_norm else nn.Identity()

    def _make_projections(self, dim: int, options: AttentionOptions) -> None:
        self.qkv = nn.Linear(dim, 3 * dim, bias=options.qkv_bias)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens -> packed q, k, v ``(b, n, 3 * dim)``."""
        return self.qkv(x)

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        dropout = self.attn_drop if self.training else 0.0
        x = attend(self.project(x), self.num_heads, self.q_norm, self.k_norm, dropout, rotation, mask)
        return self.proj_drop(self.proj(self.norm(x)))


class EvaAttention(Attention):
    """Attention with biases on q and v but none on k, stored as ``qkv.weight``, ``q_bias``, ``v_bias``
    (BEiT, Bao et al. 2022; EVA and EVA-02, Fang et al. 2023; timm's ``EvaAttention``). A k bias would
    only add a per-query constant to the logits, which softmax ignores.
    """

    def _make_projections(self, dim: int, options: AttentionOptions) -> None:
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if options.qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if options.qkv_bias else None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_bias is None:
            return self.qkv(x)
        # through the module, not its .weight: a linear with adapters (vitzoo.lora) adds its own part
        return self.qkv(x) + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])


class EvaSplitAttention(Attention):
    """:class:`EvaAttention` with three projections ``q_proj``, ``k_proj`` (no bias), ``v_proj``, as the
    EVA-02 base and large checkpoints store them (timm's ``EvaAttention(qkv_fused=False)``)."""

    def _make_projections(self, dim: int, options: AttentionOptions) -> None:
        self.q_proj = nn.Linear(dim, dim, bias=options.qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=options.qkv_bias)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


class GroupedQueryAttention(Attention):
    """Grouped-query attention: ``kv_heads`` key/value heads, each shared by ``num_heads / kv_heads`` query
    heads, so k and v cost a fraction of q (GQA, Ainslie et al. 2023; Sapiens2, Khirodkar et al. 2026; timm's
    ``AttentionRope(num_kv_heads=...)``). Separate ``q_proj`` / ``k_proj`` / ``v_proj``, each with a bias
    when ``qkv_bias``; ``kv_heads = num_heads`` is ordinary multi-head attention in that layout.
    """

    def _make_projections(self, dim: int, options: GroupedQueryOptions) -> None:
        self.kv_heads = options.kv_heads or self.num_heads
        kv_dim = dim // self.num_heads * self.kv_heads
        self.q_proj = nn.Linear(dim, dim, bias=options.qkv_bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=options.qkv_bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=options.qkv_bias)

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = (rearrange(proj(x), "b n (h d) -> b h n d", h=self.kv_heads) for proj in (self.k_proj, self.v_proj))
        x = attend_heads(q, k, v, self.q_norm, self.k_norm, self.attn_drop if self.training else 0.0, rotation,
                         self.num_heads // self.kv_heads, mask)
        return self.proj_drop(self.proj(self.norm(x)))


class DiffAttention(Attention):
    """Differential attention: two softmax maps from two halves of each head's q and k, the second
    subtracted with a learned weight lambda, cancelling attention noise (Differential Transformer, Ye et al.
    2025; timm's ``DiffAttention``, the ``dwee``/``dlittle`` SBB models). Each head's output is RMS-normed
    (``sub_norm``) and scaled by ``1 - lambda_init``, where ``lambda_init`` rises with the layer index.
    """

    def __init__(
        self, dim: int, num_heads: int, norm: NormFactory, attn_drop: float = 0.0, proj_drop: float = 0.0,
        layer: int = 0, *, options: AttentionOptions = AttentionOptions(),
    ) -> None:
        super().__init__(dim, num_heads, norm, attn_drop, proj_drop, layer, options=options)
        half_dim = dim // num_heads // 2
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(nn.init.normal_(torch.empty(half_dim), std=0.1)))
        self.sub_norm = nn.RMSNorm(2 * half_dim, eps=1e-5)
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer)

    def _make_qk_norms(self, head_dim: int, norm: NormFactory, qk_norm: bool) -> None:
        super()._make_qk_norms(head_dim // 2, norm, qk_norm)  # q and k are split in two halves per head

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if rotation is not None:
            raise ValueError("attn='diff' does not support rotary positions; use rope='none'")
        lambdas = (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2)
        x = differential_attend(self.project(x), self.num_heads, self.q_norm, self.k_norm, lambdas, self.lambda_init,
                                self.sub_norm, self.attn_drop if self.training else 0.0, mask)
        return self.proj_drop(self.proj(self.norm(x)))


def differential_attend(
    qkv: torch.Tensor, num_heads: int, q_norm: nn.Module, k_norm: nn.Module, lambdas: tuple[torch.Tensor, ...],
    lambda_init: float, sub_norm: nn.Module, dropout: float = 0.0, mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed q, k, v ``(b, n, 3 * dim)`` -> differential attention values ``(b, n, dim)`` (see
    :class:`DiffAttention`); ``lambdas`` are ``(lambda_q1, lambda_k1, lambda_q2, lambda_k2)``."""
    q, k, v = rearrange(qkv, "b n (qkv e) -> qkv b n e", qkv=3)
    q1, q2 = q_norm(rearrange(q, "b n (h two d) -> two b h n d", two=2, h=num_heads))
    k1, k2 = k_norm(rearrange(k, "b n (h two d) -> two b h n d", two=2, h=num_heads))
    v = rearrange(v, "b n (h e) -> b h n e", h=num_heads)
    lq1, lk1, lq2, lk2 = lambdas
    lam = torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + lambda_init
    out = F.scaled_dot_product_attention(q1, k1, v, attn_mask=mask, dropout_p=dropout)
    out = out - lam * F.scaled_dot_product_attention(q2, k2, v, attn_mask=mask, dropout_p=dropout)
    return rearrange(sub_norm(out) * (1 - lambda_init), "b h n e -> b n (h e)")


def _attention_probe(module: nn.Module, args: tuple) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``forward(x, None)`` on ``(2, 5, dim)`` tokens must keep their shape."""
    x = torch.randn(2, 5, args[0], **like_module(module))
    return module(x, None), tuple(x.shape)


ATTENTIONS: BlockTable = BlockTable(
    "attn", "factory(dim, num_heads, norm, attn_drop, proj_drop, layer, *, options) -> module with "
    "forward(x, rotation, mask=None) (b, n, dim) -> (b, n, dim)", probe=_attention_probe,
)
ATTENTIONS.register("mhsa", Attention, options=AttentionOptions)
ATTENTIONS.register("eva", EvaAttention, options=AttentionOptions)
ATTENTIONS.register("eva_split", EvaSplitAttention, options=AttentionOptions)
ATTENTIONS.register("gqa", GroupedQueryAttention, options=GroupedQueryOptions)
ATTENTIONS.register("diff", DiffAttention, options=AttentionOptions)
