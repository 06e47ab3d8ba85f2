"""Reader of timm's ``VisionTransformerSAM`` (Segment Anything's image encoder, ViTDet's backbone).

Its blocks hold windowed attention (vitzoo's ``attn="windowed"``, one ``window`` per block: 0 at timm's
``global_attn_indexes``), its position table is ``(1, h, w, dim)`` (``pos_embed="grid_table"``) and its ``neck``
turns the token grid into the map ``forward_features`` returns (the ``features`` slot). timm's SAM also runs at
other image sizes; the vitzoo model is built for ``img_size`` (build it at the size you need).
"""

from __future__ import annotations

from typing import Any

from timm.layers import ClassifierHead, LayerNorm2d, LayerScale
from timm.models.vision_transformer_sam import Block, VisionTransformerSAM
from torch import nn

from vitzoo.spec import Dropouts, ViTSpec
from vitzoo.timm_compat import _mlp, _norm_kind, _patch_embed, _present, mlp_ratio_for, refuse

TIMM_CLASS = VisionTransformerSAM
POOLS = {"avg": "avg", "max": "max", "avgmax": "avgmax"}  # timm's pool_type -> vitzoo's pool over the map


def _block(i: int, block: nn.Module, dim: int) -> dict[str, Any]:
    """The spec values one SAM block implies."""
    where = f"blocks.{i}"
    if type(block) is not Block:
        raise refuse(where, type(block).__name__, "block_fn")
    attn = block.attn
    if attn.rope is not None:
        raise refuse(f"{where}.attn.rope", "rotary positions in windowed attention", "use_rope")
    mlp, hidden, bias = _mlp(f"{where}.mlp", block.mlp)
    if not bias:
        raise refuse(f"{where}.mlp", "an MLP without biases", "mlp_layer")
    ls = (block.ls1, block.ls2)
    if any(_present(m) and type(m) is not LayerScale for m in ls):
        raise refuse(f"{where}.ls1/ls2", "a custom layer scale", "init_values")
    return {
        "window": block.window_size, "rel_pos": bool(attn.use_rel_pos), "mlp": mlp, "num_heads": attn.num_heads,
        "mlp_ratio": mlp_ratio_for(hidden, dim), "qkv_bias": attn.qkv.bias is not None,
        "qk_norm": _present(attn.q_norm),
        "layer_scale": ls[0].init_values if _present(ls[0]) else None,
        "attn_drop": float(attn.attn_drop.p), "proj_drop": float(attn.proj_drop.p),
        "drop_path": float(getattr(block.drop_path1, "drop_prob", 0.0)),
    }


def _features(neck: nn.Module) -> dict[str, Any] | str:
    """The ``features`` slot value of timm's ``neck``."""
    if type(neck) is LayerNorm2d:
        return {"name": "norm_map", "eps": float(neck.eps)}
    convs = list(neck) if isinstance(neck, nn.Sequential) else []
    if [type(m) for m in convs] == [nn.Conv2d, LayerNorm2d, nn.Conv2d, LayerNorm2d] and convs[1].eps == convs[3].eps:
        return {"name": "conv_neck", "channels": convs[0].out_channels, "eps": float(convs[1].eps)}
    raise refuse("neck", type(neck).__name__, "neck_chans=None with head_hidden_size")


def spec(model: VisionTransformerSAM) -> ViTSpec:
    """The :class:`ViTSpec` of a built ``VisionTransformerSAM``."""
    pe, dim = model.patch_embed, model.embed_dim
    patch_embed, patch = _patch_embed(pe, model.in_chans)
    blocks = [_block(i, b, dim) for i, b in enumerate(model.blocks)]
    fixed = {k: v for k, v in blocks[0].items() if k not in ("window", "rel_pos", "drop_path")}
    for i, fields in enumerate(blocks):
        for key, value in fixed.items():
            if fields[key] != value:
                raise refuse(f"blocks.{i}", f"{key}={fields[key]!r} unlike blocks.0 ({value!r})", key)
    norms = {f"blocks.{i}.{n}": getattr(b, n) for i, b in enumerate(model.blocks) for n in ("norm1", "norm2")}
    if _present(model.norm_pre):
        norms["norm_pre"] = model.norm_pre
    kinds = {name: _norm_kind(name, m) for name, m in norms.items()}
    if len(set(kinds.values())) > 1:
        raise refuse("norm_layer", "norms of different kinds or eps", "norm_layer")
    norm, eps = kinds["blocks.0.norm1"]
    head = model.head
    if type(head) is not ClassifierHead:
        raise refuse("head", type(head).__name__, "head_hidden_size")
    if model.global_pool not in POOLS or head.use_conv:
        raise refuse("head.global_pool", repr(model.global_pool), "global_pool")
    windows = tuple(b["window"] for b in blocks)
    rel_pos = tuple(b["rel_pos"] for b in blocks)
    attn = {"name": "windowed", "window": windows if len(set(windows)) > 1 else windows[0],
            "rel_pos": rel_pos if len(set(rel_pos)) > 1 else rel_pos[0],
            "qkv_bias": fixed["qkv_bias"], "qk_norm": fixed["qk_norm"]}
    return ViTSpec(
        img_size=tuple(pe.img_size), patch_size=patch, in_chans=model.in_chans,
        patch_embed={"name": patch_embed, "bias": pe.proj.bias is not None, "norm": _present(pe.norm)},
        num_classes=head.fc.out_features if isinstance(head.fc, nn.Linear) else 0,
        embed_dim=dim, depth=len(blocks), num_heads=fixed["num_heads"], mlp_ratio=fixed["mlp_ratio"],
        pos_embed="grid_table" if model.pos_embed is not None else "none",
        attn=attn, mlp=fixed["mlp"], norm={"name": norm, "eps": eps},
        block={"name": "prenorm", "layer_scale": fixed["layer_scale"]},
        pool=POOLS[model.global_pool], features=_features(model.neck), class_token=False,
        pre_norm=_present(model.norm_pre), final_norm="none",
        drop=Dropouts(head=float(head.drop.p), pos=float(model.pos_drop.p),
                      patch=float(getattr(model.patch_drop, "prob", 0.0)), attn=fixed["attn_drop"],
                      proj=fixed["proj_drop"], path=blocks[-1]["drop_path"]),
    )
