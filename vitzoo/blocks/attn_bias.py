"""Attention-bias slot: one bias on the attention logits of every block, computed once per forward from the patch
grid and shared by all blocks (timm's ``shared_rel_pos``, the ``vit_srelpos_*`` models; BEiT's shared
relative-position bias).

Contract: ``factory(grid_size, num_prefix, num_heads, *, options) -> nn.Module`` with ``forward(grid)`` returning
an additive float bias ``(1, heads, num_prefix + h * w, num_prefix + h * w)`` for a patch grid ``(h, w)``, or None.
The model stores the module as ``shared_rel_pos`` (timm's name) and hands the bias to every block as its attention
``mask`` (the attention adds it to its logits in ``F.scaled_dot_product_attention``). Only the ``none`` entry
returns None: the model skips it by name, so a ``torch.fx`` graph knows without running it. A model with a bias
takes image batches, not patch sequences (their images have grids of their own).
"""

from __future__ import annotations

import torch
from torch import nn

from vitzoo.blocks.relpos import RelPosMlp, RelPosMlpShape, RelPosTable
from vitzoo.blocks.table import BlockTable

Grid = tuple[int, int]


class NoAttentionBias(nn.Module):
    """No shared bias: each attention sees the logits as they are (ViT)."""

    def __init__(self, grid_size: Grid, num_prefix: int, num_heads: int) -> None:
        super().__init__()

    def forward(self, grid: Grid) -> None:
        return None


def _bias_probe(module: nn.Module, args: tuple) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``forward(grid_size)`` must give ``(1, heads, n, n)`` for ``n = num_prefix + h * w``, or None."""
    grid_size, num_prefix, num_heads = args[:3]
    n = num_prefix + grid_size[0] * grid_size[1]
    out = module(tuple(grid_size))
    return (torch.empty(1, num_heads, n, n) if out is None else out), (1, num_heads, n, n)


ATTN_BIASES: BlockTable = BlockTable(
    "attn_bias", "factory(grid_size, num_prefix, num_heads, *, options) -> module with forward(grid) -> float bias "
    "(1, heads, num_prefix + h * w, num_prefix + h * w) or None", probe=_bias_probe,
)
ATTN_BIASES.register("none", NoAttentionBias)
ATTN_BIASES.register("relpos_mlp", RelPosMlp, options=RelPosMlpShape)
ATTN_BIASES.register("relpos_bias", RelPosTable)
