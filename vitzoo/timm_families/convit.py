"""Reader of timm's ``ConVit`` (ConViT, d'Ascoli et al. 2021): GPSA blocks over the patch grid, then the class token
joins (``prefix_join={"at": local_up_to_layer}``) for blocks of plain attention. ``locality_strength`` only scales
GPSA's initial positional weights and is not kept: the twin gets timm's weights."""

from __future__ import annotations

from timm.layers import PatchEmbed
from timm.models.convit import GPSA, MHSA, Block, ConVit
from torch import nn

from vitzoo.spec import Dropouts, ViTSpec
from vitzoo.timm_compat import _norm_kind, _patch_embed, _present, mlp_ratio_for, refuse
from vitzoo.timm_families.cait import POOLS, common

TIMM_CLASS = ConVit


def spec(model: ConVit) -> ViTSpec:
    """The :class:`ViTSpec` of a built timm ``ConVit``."""
    pe, dim, depth = model.patch_embed, model.embed_dim, len(model.blocks)
    if type(pe) is not PatchEmbed:
        raise refuse("patch_embed", type(pe).__name__, "hybrid_backbone")
    patch_embed, patch = _patch_embed(pe, model.in_chans)
    if model.cls_token is None:
        raise refuse("cls_token", "None (pruned)", "prune_intermediate_layers")
    if model.local_up_to_layer >= depth:  # timm then never adds the class token and reads patch 0
        raise refuse("local_up_to_layer", f"{model.local_up_to_layer} with {depth} blocks", "local_up_to_layer")
    if model.global_pool not in POOLS:
        raise refuse("global_pool", repr(model.global_pool), "global_pool")
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
    if _present(model.norm) and _norm_kind("norm", model.norm) != fixed["norm"]:
        raise refuse("norm", "a norm unlike the blocks'", "norm_layer")
    attn = first.attn
    return ViTSpec(
        img_size=tuple(pe.img_size), patch_size=patch, in_chans=model.in_chans,
        patch_embed={"name": patch_embed, "bias": pe.proj.bias is not None, "norm": _present(pe.norm)},
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        embed_dim=dim, depth=depth, num_heads=attn.num_heads,
        mlp_ratio=mlp_ratio_for(fixed["hidden"], dim), mlp=fixed["mlp"],
        attn={"name": names[0] if len(set(names)) == 1 else names, "qkv_bias": biases.pop()},
        norm={"name": fixed["norm"][0], "eps": fixed["norm"][1]},
        pos_embed={"name": "learned", "prefix": False} if model.use_pos_embed else "none",
        prefix_join={"at": model.local_up_to_layer},
        pool=POOLS[model.global_pool], final_norm="tokens" if _present(model.norm) else "none",
        drop=Dropouts(head=float(model.head_drop.p), pos=float(model.pos_drop.p), attn=float(attn.attn_drop.p),
                      proj=float(attn.proj_drop.p),
                      path=float(getattr(model.blocks[-1].drop_path, "drop_prob", 0.0))),
    )
