"""Reader of timm's ``Beit`` (BEiT, BEiT v2): BEiT's attention (q/v biases, a relative-position table per block
with rows for the class token) or, without relative positions, EVA's; LayerScale as ``gamma_1/gamma_2``."""

from __future__ import annotations

import dataclasses

from timm.models.beit import Beit

from vitzoo.spec import ViTSpec
from vitzoo.timm_compat import refuse
from vitzoo.timm_families.relpos import common_fields

TIMM_CLASS = Beit


def spec(model: Beit) -> ViTSpec:
    """The :class:`ViTSpec` of a built timm ``Beit``."""
    if model.rel_pos_bias is not None:
        raise refuse("rel_pos_bias", "one relative-position table shared by all blocks", "use_shared_rel_pos_bias")
    block = model.blocks[0]
    attn = block.attn
    if attn.qkv.out_features != 3 * model.embed_dim:
        raise refuse("blocks.0.attn.qkv", f"heads of width {attn.qkv.out_features // 3 // attn.num_heads}, not "
                     f"embed_dim / num_heads", "attn_head_dim")
    fields = common_fields(model, attn, block.mlp)
    fields["attn"] = {"name": "eva" if attn.relative_position_bias_table is None else "beit",
                      "qkv_bias": attn.q_bias is not None}
    fields["block"] = {"name": "eva", "layer_scale": block.init_values if block.gamma_1 is not None else None}
    fields["drop"] = dataclasses.replace(fields["drop"], pos=float(model.pos_drop.p))
    return ViTSpec(**fields, pos_embed="none" if model.pos_embed is None else "learned")
