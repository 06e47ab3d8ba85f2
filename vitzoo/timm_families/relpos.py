"""Reader of timm's ``VisionTransformerRelPos`` (the ``vit_relpos_*`` models): relative-position attention
(``relpos_mlp`` / ``relpos_bias``, or one module shared by all blocks as ``attn_bias``), pre-norm blocks with
LayerScale or res-post-norm blocks, no position table. :func:`common_fields` also serves the reader of timm's
``Beit`` (:mod:`vitzoo.timm_families.beit`)."""

from __future__ import annotations

from typing import Any

from timm.layers import LayerScale, RelPosBias, RelPosMlp
from timm.models.vision_transformer_relpos import RelPosBlock, ResPostRelPosBlock, VisionTransformerRelPos
from torch import nn

from vitzoo.spec import Dropouts, ViTSpec
from vitzoo.timm_compat import _mlp, _norm_kind, _norms, _patch_embed, _present, mlp_ratio_for, refuse

TIMM_CLASS = VisionTransformerRelPos
BLOCKS = {RelPosBlock: "prenorm", ResPostRelPosBlock: "respost"}
POOLS = {"avg": "avg", "token": "token", "": "none"}


def common_fields(model: nn.Module, attn: nn.Module, mlp: nn.Module) -> dict[str, Any]:
    """The spec fields timm's Beit and VisionTransformerRelPos read alike: patch embedding, sizes, MLP, norms,
    pooling, dropout (``attn`` and ``mlp`` are the first block's)."""
    pe, dim = model.patch_embed, model.embed_dim
    patch_embed, patch = _patch_embed(pe, model.in_chans)
    if any(side % patch for side in pe.img_size) or pe.dynamic_img_pad or getattr(pe, "dynamic_img_size", False):
        raise refuse("patch_embed", "an image size other than whole patches of img_size", "img_size")
    mlp_name, hidden, mlp_bias = _mlp("blocks.0.mlp", mlp)
    kinds = {name: _norm_kind(name, m) for name, m in _norms(model).items()}
    if len(set(kinds.values())) > 1:
        raise refuse("norm", f"several kinds {sorted(set(kinds.values()))}", "norm_layer")
    if model.global_pool not in POOLS:
        raise refuse("global_pool", repr(model.global_pool), "global_pool")
    pool = POOLS[model.global_pool]
    final_norm = "pooled" if _present(model.fc_norm) else "tokens" if _present(model.norm) else "none"
    drop_path = getattr(model.blocks[-1].drop_path1, "drop_prob", 0.0)
    return dict(
        img_size=tuple(pe.img_size), patch_size=patch, in_chans=model.in_chans,
        patch_embed={"name": patch_embed, "bias": pe.proj.bias is not None, "norm": _present(pe.norm)},
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        embed_dim=dim, depth=len(model.blocks), num_heads=attn.num_heads, mlp_ratio=mlp_ratio_for(hidden, dim),
        mlp={"name": mlp_name, "bias": mlp_bias, "inner_norm": _present(mlp.norm)},
        norm=dict(zip(("name", "eps"), next(iter(kinds.values())), strict=True)),
        pool=pool, final_norm="auto" if final_norm == ("pooled" if pool == "avg" else "tokens") else final_norm,
        drop=Dropouts(head=float(model.head_drop.p), attn=float(attn.attn_drop.p), proj=float(attn.proj_drop.p),
                      path=float(drop_path)),
    )


def rel_pos_attention(where: str, rel_pos: nn.Module | None) -> dict[str, Any]:
    """The entry and options of a relative-position module: of a block's ``attn``, or of ``attn_bias`` when shared
    (the two slots name their entries alike)."""
    if type(rel_pos) is RelPosMlp:
        if rel_pos.mode not in ("cr", "swin") or any(rel_pos.pretrained_window_size):
            raise refuse(f"{where}.rel_pos", f"RelPosMlp(mode={rel_pos.mode!r}, pretrained_window_size="
                         f"{rel_pos.pretrained_window_size})", "rel_pos_type")
        return {"name": "relpos_mlp", "hidden_dim": rel_pos.mlp.fc1.out_features, "mode": rel_pos.mode}
    if type(rel_pos) is RelPosBias:
        return {"name": "relpos_bias"}
    raise refuse(f"{where}.rel_pos", type(rel_pos).__name__, "rel_pos_type")


def spec(model: VisionTransformerRelPos) -> ViTSpec:
    """The :class:`ViTSpec` of a built timm ``VisionTransformerRelPos``."""
    block = model.blocks[0]
    if type(block) not in BLOCKS:
        raise refuse("blocks.0", type(block).__name__, "block_fn")
    attn = block.attn
    ls = getattr(block, "ls1", None)
    if _present(ls) and type(ls) is not LayerScale:
        raise refuse("blocks.0.ls1", type(ls).__name__, "init_values")
    fields = common_fields(model, attn, block.mlp)
    attn_options = {"qkv_bias": attn.qkv.bias is not None, "qk_norm": _present(attn.q_norm)}
    if model.shared_rel_pos is None:
        fields["attn"] = {**rel_pos_attention("blocks.0.attn", attn.rel_pos), **attn_options}
    else:  # one module for all blocks: the same entries in the attn_bias slot, plain attention in the blocks
        fields["attn"] = {"name": "mhsa", **attn_options}
        fields["attn_bias"] = rel_pos_attention("shared_rel_pos", model.shared_rel_pos)
    fields["block"] = {"name": BLOCKS[type(block)], "layer_scale": ls.init_values if _present(ls) else None}
    return ViTSpec(**fields, pos_embed="none", class_token=model.cls_token is not None)
