"""Reader of timm's ``Cait`` (CaiT, Touvron et al. 2021): talking-heads blocks with LayerScale, then the class token
joins for the class-attention blocks (``prefix_join="class_attn"``)."""

from __future__ import annotations

from typing import Any

from timm.layers import Mlp, PatchEmbed
from timm.models.cait import Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn
from torch import nn

from vitzoo.spec import Dropouts, ViTSpec
from vitzoo.timm_compat import _mlp, _norm_kind, _patch_embed, _present, mlp_ratio_for, refuse

TIMM_CLASS = Cait
POOLS = {"token": "token", "avg": "avg", "": "none"}


def layer_scale(gamma: nn.Parameter) -> float:
    """The LayerScale init a ``gamma`` shows (timm does not keep ``init_values``): its mean size as built, or 1e-5
    on the meta device, where there are no values (any value loads the weights the same)."""
    value = 0.0 if gamma.is_meta else float(gamma.detach().abs().mean())
    return value if value > 0 else 1e-5


def common(model: nn.Module, where: str, block: nn.Module) -> dict[str, Any]:
    """Norm and MLP of one block: what every block of the model must agree on."""
    mlp, hidden, bias = _mlp(f"{where}.mlp", block.mlp)
    if type(block.mlp) is not Mlp or not bias or _present(block.mlp.norm):
        raise refuse(f"{where}.mlp", type(block.mlp).__name__, "mlp_block")
    return {"norm": _norm_kind(f"{where}.norm1", block.norm1), "mlp": mlp, "hidden": hidden}


def trunk_fields(model: nn.Module, fixed: dict[str, Any], num_heads: int) -> dict[str, Any]:
    """The :class:`ViTSpec` fields CaiT and ConViT read alike: input and patch embedding, sizes, the blocks' MLP
    and norm (``fixed``, from :func:`common`), pooling and the final norm, which must be the blocks' kind."""
    pe, dim = model.patch_embed, model.embed_dim
    if type(pe) is not PatchEmbed:
        raise refuse("patch_embed", type(pe).__name__, "patch_layer")
    if model.global_pool not in POOLS:
        raise refuse("global_pool", repr(model.global_pool), "global_pool")
    if _present(model.norm) and _norm_kind("norm", model.norm) != fixed["norm"]:
        raise refuse("norm", "a norm unlike the blocks'", "norm_layer")
    patch_embed, patch = _patch_embed(pe, model.in_chans)
    return dict(
        img_size=tuple(pe.img_size), patch_size=patch, in_chans=model.in_chans,
        patch_embed={"name": patch_embed, "bias": pe.proj.bias is not None, "norm": _present(pe.norm)},
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        embed_dim=dim, depth=len(model.blocks), num_heads=num_heads,
        mlp_ratio=mlp_ratio_for(fixed["hidden"], dim), mlp=fixed["mlp"],
        norm={"name": fixed["norm"][0], "eps": fixed["norm"][1]},
        pool=POOLS[model.global_pool], final_norm="tokens" if _present(model.norm) else "none",
    )


def spec(model: Cait) -> ViTSpec:
    """The :class:`ViTSpec` of a built timm ``Cait``."""
    dim = model.embed_dim
    if model.blocks_token_only is None or model.cls_token is None:
        raise refuse("blocks_token_only", "None (pruned)", "prune_intermediate_layers")
    first = model.blocks[0]
    fixed = common(model, "blocks.0", first)
    for i, block in enumerate(model.blocks):
        if type(block) is not LayerScaleBlock or type(block.attn) is not TalkingHeadAttn:
            raise refuse(f"blocks.{i}", f"{type(block).__name__} with {type(block.attn).__name__}", "block_layers")
        same_bias = (block.attn.qkv.bias is None) == (first.attn.qkv.bias is None)
        if common(model, f"blocks.{i}", block) != fixed or not same_bias:
            raise refuse(f"blocks.{i}", "a norm, MLP or qkv bias unlike blocks.0", "block_layers")
        if getattr(block.drop_path, "drop_prob", 0.0) > 0:  # vitzoo's rate rises from 0 at block 0
            raise refuse(f"blocks.{i}.drop_path", "the same rate in every block", "drop_path_rate")
    token = model.blocks_token_only
    for i, block in enumerate(token):
        where = f"blocks_token_only.{i}"
        if type(block) is not LayerScaleBlockClassAttn or type(block.attn) is not ClassAttn:
            raise refuse(where, f"{type(block).__name__} with {type(block.attn).__name__}", "block_layers_token")
        ours = common(model, where, block)
        if (ours["norm"], ours["mlp"]) != (fixed["norm"], fixed["mlp"]) or ours != common(model, where, token[0]):
            raise refuse(where, "a norm or MLP unlike the other blocks'", "mlp_block_token_only")
    attn = first.attn
    return ViTSpec(
        **trunk_fields(model, fixed, attn.num_heads),
        attn={"name": "talking_heads", "qkv_bias": attn.qkv.bias is not None},
        block={"name": "eva", "layer_scale": layer_scale(first.gamma_1)},
        pos_embed={"name": "learned", "prefix": False},
        prefix_join={"name": "class_attn", "depth": len(token), "qkv_bias": token[0].attn.q.bias is not None,
                     "mlp_ratio": mlp_ratio_for(token[0].mlp.fc1.out_features, dim),
                     "layer_scale": layer_scale(token[0].gamma_1)},
        drop=Dropouts(head=float(model.head_drop.p), pos=float(model.pos_drop.p), attn=float(attn.attn_drop.p),
                      proj=float(attn.proj_drop.p)),
    )
