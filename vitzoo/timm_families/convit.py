"""Reader of timm's ``ConVit`` (ConViT, d'Ascoli et al. 2021): GPSA blocks over the patch grid, then the class token
joins (``prefix_join={"at": local_up_to_layer}``) for blocks of plain attention. ``locality_strength`` only scales
GPSA's initial positional weights and is not kept: the twin gets timm's weights."""

from __future__ import annotations

from timm.models.convit import GPSA, MHSA, Block, ConVit

from vitzoo.spec import Dropouts, ViTSpec
from vitzoo.timm_compat import refuse
from vitzoo.timm_families.cait import common, trunk_fields

TIMM_CLASS = ConVit


def spec(model: ConVit) -> ViTSpec:
    """The :class:`ViTSpec` of a built timm ``ConVit``."""
    depth = len(model.blocks)
    if model.cls_token is None:
        raise refuse("cls_token", "None (pruned)", "prune_intermediate_layers")
    if model.local_up_to_layer >= depth:  # timm then never adds the class token and reads patch 0
        raise refuse("local_up_to_layer", f"{model.local_up_to_layer} with {depth} blocks", "local_up_to_layer")
    first = model.blocks[0]
    fixed = common(model, "blocks.0", first)
    names, biases = [], set()
    for i, block in enumerate(model.blocks):
        kind = {GPSA: "gpsa", MHSA: "mhsa"}.get(type(block.attn))
        if type(block) is not Block or kind is None:
            raise refuse(f"blocks.{i}", f"{type(block).__name__} with {type(block.attn).__name__}", "use_gpsa")
        if common(model, f"blocks.{i}", block) != fixed:
            raise refuse(f"blocks.{i}", "a norm or MLP unlike blocks.0", "norm_layer")
        names.append(kind)
        biases.add((block.attn.qk if kind == "gpsa" else block.attn.qkv).bias is not None)
    if len(biases) > 1:
        raise refuse("blocks.*.attn", "qkv biases in some blocks only", "qkv_bias")
    attn = first.attn
    return ViTSpec(
        **trunk_fields(model, fixed, attn.num_heads),
        attn={"name": names[0] if len(set(names)) == 1 else names, "qkv_bias": biases.pop()},
        pos_embed={"name": "learned", "prefix": False} if model.use_pos_embed else "none",
        prefix_join={"at": model.local_up_to_layer},
        drop=Dropouts(head=float(model.head_drop.p), pos=float(model.pos_drop.p), attn=float(attn.attn_drop.p),
                      proj=float(attn.proj_drop.p),
                      path=float(getattr(model.blocks[-1].drop_path, "drop_prob", 0.0))),
    )
