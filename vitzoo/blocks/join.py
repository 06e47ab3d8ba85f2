"""Prefix-join slot (``prefix_join``): where and how the class (distillation, register) tokens join the patch tokens.

Contract: ``factory(dim, num_heads, mlp_ratio, norm, mlp, num_prefix, *, options) -> nn.Module`` with
``forward(x, prefix)`` mapping the patch tokens ``(b, n, dim)`` and the prefix tokens ``(b, num_prefix, dim)`` to
the sequence ``(b, num_prefix + n, dim)``, prefix tokens in front; ``norm`` is the model's norm factory and
``mlp(dim, hidden_dim)`` builds the model's MLP entry, as for the pooling slot. The options class has
``joins_at(depth)``: the index of the block before which the join happens (``depth``: after the last block);
a join after block 0 leaves the position table without prefix rows.
The model holds the module under the name in its ``stored_as`` attribute, the state_dict prefix of its weights.

ViT puts the prefix tokens in front before the first block (``front``, ``at = 0``). ConViT (d'Ascoli et al.
2021) lets its gated positional self-attention layers see the patch grid alone and appends the class token before
block 10 (``front``, ``at = 10``). CaiT (Touvron et al. 2021) keeps the class token out of every encoder block and
lets it gather the image in a few class-attention blocks after them (``class_attn``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vitzoo.blocks.encoder import EvaBlock, LayerScaleOptions
from vitzoo.blocks.norm import NormFactory
from vitzoo.blocks.options import BlockOptions
from vitzoo.blocks.table import BlockTable, like_module
from vitzoo.fields import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, described

# torch.fx symbolic tracing keeps the einops calls as graph nodes: einops needs real tensors and shapes
torch.fx.wrap("rearrange")

MlpFactory = Callable[[int, int], nn.Module]


@dataclass(frozen=True)
class JoinOptions(BlockOptions):
    """Options of every prefix-join entry."""

    def joins_at(self, depth: int) -> int:
        """The block index before which the prefix tokens join (``depth``: after the last block)."""
        return depth

    def check(self, spec) -> None:
        if self.joins_at(spec.depth) == 0 or not spec.num_prefix_tokens:
            return
        if spec.rope.name != "none":
            raise ValueError("prefix tokens that join after the first block would shift the rotary positions of "
                             "the patch tokens; use rope='none', or prefix_join='front'")


@dataclass(frozen=True)
class FrontJoinOptions(JoinOptions):
    """Options of ``front``."""

    at: int = described(
        0, "the prefix tokens join before this block (ConViT: 10); depth or more: after the last block",
        NON_NEGATIVE)

    def joins_at(self, depth: int) -> int:
        return min(self.at, depth)


@dataclass(frozen=True)
class ClassAttentionOptions(JoinOptions):
    """Options of ``class_attn``."""

    depth: int = described(2, "class-attention blocks (CaiT: 2)", AT_LEAST_ONE)
    mlp_ratio: float | None = described(
        None, "hidden width / embed_dim of their MLPs; None: the model's mlp_ratio", POSITIVE)
    qkv_bias: bool = described(True, "biases on their q, k, v projections")
    layer_scale: float | None = described(
        None, "initial value of their LayerScale (gamma_1, gamma_2); None: off", POSITIVE)


class FrontJoin(nn.Module):
    """The prefix tokens put in front of the tokens, no parameters (ViT: before block 0; ConViT: later)."""

    stored_as = "prefix_join"

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm: NormFactory, mlp: MlpFactory, num_prefix: int, *,
        options: FrontJoinOptions = FrontJoinOptions(),
    ) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        return torch.cat([prefix, x], dim=1)


class ClassAttention(nn.Module):
    """Attention in which only the prefix (class) tokens query, over the prefix and patch tokens together
    (CaiT's class attention, timm's ``ClassAttn``): separate ``q``, ``k``, ``v`` projections and ``proj``."""

    def __init__(self, dim: int, num_heads: int, num_queries: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads, self.num_queries = num_heads, num_queries
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(b, n, dim)``, the queries first -> the queries' new values ``(b, num_queries, dim)``."""
        q = rearrange(self.q(x[:, : self.num_queries]), "b q (h d) -> b h q d", h=self.num_heads)
        k, v = (rearrange(proj(x), "b n (h d) -> b h n d", h=self.num_heads) for proj in (self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(attended, "b h q d -> b q (h d)"))


class ClassAttentionBlock(EvaBlock):
    """One CaiT class-attention block: the prefix tokens attend to themselves and the patch tokens (pre-norm),
    then go through the MLP; the patch tokens are read, never changed. LayerScale as ``gamma_1`` / ``gamma_2``
    (timm's ``LayerScaleBlockClassAttn``)."""

    def forward(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        tokens = torch.cat([prefix, x], dim=1)
        prefix = prefix + self.drop_path1(self._scale(self.attn(self.norm1(tokens)), self.gamma_1))
        return prefix + self.drop_path2(self._scale(self.mlp(self.norm2(prefix)), self.gamma_2))


class ClassAttentionStage(nn.ModuleList):
    """CaiT's class-attention stage ("Going deeper with image transformers", Touvron et al. 2021): after the
    encoder blocks, ``depth`` :class:`ClassAttentionBlock` update the prefix tokens from the patch tokens, so
    the blocks before process the image alone. Stored as timm's ``blocks_token_only.N``; no dropout, as CaiT."""

    stored_as = "blocks_token_only"

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm: NormFactory, mlp: MlpFactory, num_prefix: int, *,
        options: ClassAttentionOptions = ClassAttentionOptions(),
    ) -> None:
        hidden = int(dim * (options.mlp_ratio or mlp_ratio))
        block_options = LayerScaleOptions(options.layer_scale)
        super().__init__(
            ClassAttentionBlock(dim, ClassAttention(dim, num_heads, num_prefix, options.qkv_bias), mlp(dim, hidden),
                                norm, options=block_options)
            for _ in range(options.depth)
        )

    def forward(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        for block in self:
            prefix = block(x, prefix)
        return torch.cat([prefix, x], dim=1)


def _join_probe(module: nn.Module, args: tuple) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Four patch tokens and the prefix tokens must give one sequence with the prefix in front."""
    dim, num_prefix = args[0], args[5]
    x, prefix = (torch.randn(2, n, dim, **like_module(module)) for n in (4, num_prefix))
    return module(x, prefix), (2, num_prefix + 4, dim)


JOINS: BlockTable = BlockTable(
    "prefix_join", "factory(dim, num_heads, mlp_ratio, norm, mlp, num_prefix, *, options) -> module with "
    "forward(x, prefix) (b, n, dim), (b, num_prefix, dim) -> (b, num_prefix + n, dim) and stored_as",
    probe=_join_probe,
)
JOINS.register("front", FrontJoin, options=FrontJoinOptions)
JOINS.register("class_attn", ClassAttentionStage, options=ClassAttentionOptions)
