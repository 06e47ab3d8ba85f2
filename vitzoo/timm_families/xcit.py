"""Reader of timm's ``Xcit`` (XCiT, El-Nouby et al. 2021): XCA blocks with local patch interaction and three
LayerScales, a conv+BatchNorm stem, the Fourier position encoding, then the class token joins for XCiT's
class-attention layers (``prefix_join="xcit_class_attn"``)."""

from __future__ import annotations

from timm.models.xcit import XCA, ClassAttentionBlock, ConvPatchEmbed, PositionalEncodingFourier, XCABlock, Xcit
from torch import nn

from vitzoo.spec import Dropouts, ViTSpec
from vitzoo.timm_compat import _present, mlp_ratio_for, refuse
from vitzoo.timm_families.cait import common, layer_scale

TIMM_CLASS = Xcit
POOLS = {"token": "token", "avg": "avg", "": "none"}


def spec(model: Xcit) -> ViTSpec:
    """The :class:`ViTSpec` of a built timm ``Xcit``."""
    pe, dim = model.patch_embed, model.embed_dim
    if type(pe) is not ConvPatchEmbed or type(pe.proj[1]).__name__ != "GELU":
        raise refuse("patch_embed", f"{type(pe).__name__} with another activation", "act_layer")
    first = model.blocks[0]
    fixed = common(model, "blocks.0", first)
    for i, block in enumerate(model.blocks):
        if type(block) is not XCABlock or type(block.attn) is not XCA:
            raise refuse(f"blocks.{i}", f"{type(block).__name__} with {type(block.attn).__name__}", "block")
        if common(model, f"blocks.{i}", block) != fixed or type(block.local_mp.act).__name__ != "GELU":
            raise refuse(f"blocks.{i}", "a norm, MLP or activation unlike blocks.0", "act_layer")
        if getattr(block.drop_path1, "drop_prob", 0.0) > 0:  # vitzoo's rate rises from 0 at block 0
            raise refuse(f"blocks.{i}.drop_path1", "the same rate in every block", "drop_path_rate")
    token = model.cls_attn_blocks
    if not len(token) or model.global_pool not in POOLS:
        raise refuse("cls_attn_blocks", f"{len(token)} layers with global_pool={model.global_pool!r}",
                     "cls_attn_layers")
    for i, block in enumerate(token):
        if type(block) is not ClassAttentionBlock or common(model, f"cls_attn_blocks.{i}", block) != fixed:
            raise refuse(f"cls_attn_blocks.{i}", "a block, norm or MLP unlike the XCA blocks'", "norm_layer")
    if model.pos_embed is not None and type(model.pos_embed) is not PositionalEncodingFourier:
        raise refuse("pos_embed", type(model.pos_embed).__name__, "use_pos_embed")
    fourier = model.pos_embed
    return ViTSpec(
        img_size=tuple(pe.img_size), patch_size=pe.patch_size, in_chans=model.in_chans, patch_embed="conv_bn",
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        embed_dim=dim, depth=len(model.blocks), num_heads=first.attn.num_heads,
        mlp_ratio=mlp_ratio_for(fixed["hidden"], dim), mlp=fixed["mlp"],
        attn={"name": "xca", "qkv_bias": first.attn.qkv.bias is not None},
        norm={"name": fixed["norm"][0], "eps": fixed["norm"][1]},
        block={"name": "xcit", "layer_scale": layer_scale(first.gamma1)},
        pos_embed="none" if fourier is None else {
            "name": "fourier", "features": fourier.hidden_dim, "temperature": float(fourier.temperature)},
        prefix_join={"name": "xcit_class_attn", "depth": len(token), "qkv_bias": token[0].attn.q.bias is not None,
                     "layer_scale": layer_scale(token[0].gamma1) if isinstance(token[0].gamma1, nn.Parameter)
                     else None, "tokens_norm": token[0].tokens_norm},
        pool=POOLS[model.global_pool], final_norm="tokens" if _present(model.norm) else "none",
        drop=Dropouts(head=float(model.head_drop.p), pos=float(model.pos_drop.p),
                      attn=float(first.attn.attn_drop.p), proj=float(first.attn.proj_drop.p)),
    )
