"""Reader of timm's Gemma 4 vision towers: ``Gemma4VitEncoder`` and ``Gemma4VitClassifier`` (the encoder held as
``encoder``, vitzoo: ``pool.checkpoint_prefix="encoder."``). The blocks are vitzoo's ``normed_qkv`` attention,
``geglu_tanh_proj`` MLP, ``sandwich`` block and ``axial_split`` RoPE; the encoder's readouts are ``cell_mean``
(``soft``), ``avg`` and ``none``, the classifier's ``avg_norm``."""

from __future__ import annotations

from typing import Any

from timm.layers import DropPath, RmsNorm
from timm.models.gemma4_vit import Gemma4VitClassifier, Gemma4VitEncoder
from torch import nn

from vitzoo.blocks.projector import TIMM_GLOBAL_POOLS
from vitzoo.spec import Dropouts, ViTSpec
from vitzoo.timm_compat import _activation, _norm_kind, _present, mlp_ratio_for, refuse

TIMM_CLASSES = (Gemma4VitEncoder, Gemma4VitClassifier)
TIMM_CLASS = TIMM_CLASSES[0]


def _block(i: int, block: nn.Module, dim: int) -> tuple[Any, ...]:
    """What vitzoo needs of one block, the same for every block of a model it can express."""
    attn, mlp = block.attn, block.mlp
    if attn.head_dim * attn.num_heads != dim:
        raise refuse(f"blocks.{i}.attn.head_dim", f"{attn.head_dim} (not embed_dim / num_heads)", "head_dim")
    if attn.num_kv_heads != attn.num_heads:
        raise refuse(f"blocks.{i}.attn.num_kv_heads", str(attn.num_kv_heads), "num_kv_heads")
    if _activation(f"blocks.{i}.mlp.act", mlp.act) != "gelu_tanh":
        raise refuse(f"blocks.{i}.mlp.act", type(mlp.act).__name__, "act_layer")
    norms = {_norm_kind(f"blocks.{i}.{name}", getattr(block, name)) for name in ("norm1", "norm2", "norm3", "norm4")}
    norms |= {_norm_kind(f"blocks.{i}.attn.{name}", getattr(attn, name)) for name in ("q_norm", "k_norm")}
    if len(norms) != 1:
        raise refuse(f"blocks.{i}", f"norms of different kinds or eps {sorted(norms)}", "norm_eps")
    if attn.proj_drop.p:  # timm drops after the attention projection only, vitzoo after both projections
        raise refuse(f"blocks.{i}.attn.proj_drop", f"Dropout({attn.proj_drop.p}) (not after the MLP)", "proj_drop_rate")
    return attn.num_heads, attn.q_proj.use_clipped, mlp.gate_proj.linear.out_features, norms.pop(), attn.attn_drop.p


def _pool(model: nn.Module, enc: nn.Module, classifier: bool) -> dict[str, Any]:
    standardized = enc.std_bias is not None
    if classifier:
        if model.global_pool not in TIMM_GLOBAL_POOLS:
            raise refuse("global_pool", repr(model.global_pool), "global_pool")
        if model.encoder_pool not in ("", "none"):
            raise refuse("encoder_pool", repr(model.encoder_pool), "encoder_pool")
        return {"name": "avg_norm", "norm": _present(model.norm), "std_buffers": standardized,
                "mean": TIMM_GLOBAL_POOLS[model.global_pool], "checkpoint_prefix": "encoder."}
    if enc.global_pool == "soft":
        return {"name": "cell_mean", "cell": enc.pooling_kernel_size, "standardize": standardized}
    if standardized:  # timm keeps the buffers but applies them in its soft readout only
        raise refuse("std_bias", f"stored with global_pool={enc.global_pool!r}", "standardize")
    return {"name": {"avg": "avg", "none": "none", "": "none"}[enc.global_pool]}


def spec(model: nn.Module) -> ViTSpec:
    """The :class:`ViTSpec` of a built Gemma 4 vision encoder or classifier."""
    classifier = isinstance(model, Gemma4VitClassifier)
    enc = model.encoder if classifier else model
    dim, blocks, embed = enc.embed_dim, enc.blocks, enc.patch_embed
    if embed.patch_size[0] != embed.patch_size[1]:
        raise refuse("patch_embed.patch_size", str(embed.patch_size), "patch_size")
    first = _block(0, blocks[0], dim)
    for i, block in enumerate(blocks):
        if _block(i, block, dim) != first:
            raise refuse(f"blocks.{i}", "a block unlike blocks.0", "depth")
    num_heads, clamp, hidden, (norm, eps), attn_drop = first
    if classifier and _present(model.norm) and (type(model.norm) is not RmsNorm or model.norm.weight is not None
                                                or (norm, eps) != ("rmsnorm", model.norm.eps)):
        raise refuse("norm", f"{type(model.norm).__name__}, not the blocks' RMSNorm without parameters", "final_norm")
    head = getattr(model, "head", None)
    path = blocks[-1].drop_path.drop_prob if isinstance(blocks[-1].drop_path, DropPath) else 0.0
    img_size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 768, 768))[-2:]
    return ViTSpec(
        img_size=tuple(img_size), patch_size=embed.patch_size[0], in_chans=enc.in_chans,
        num_classes=head.out_features if isinstance(head, nn.Linear) else 0,
        embed_dim=dim, depth=len(blocks), num_heads=num_heads, mlp_ratio=mlp_ratio_for(hidden, dim),
        patch_embed={"name": "signed_linear", "bias": embed.input_proj.bias is not None},
        pos_embed={"name": "axis_tables", "size": embed.position_embedding_size},
        attn={"name": "normed_qkv", "clamp": clamp}, mlp={"name": "geglu_tanh_proj", "clamp": clamp},
        block="sandwich", norm={"name": norm, "eps": eps},
        rope={"name": "axial_split", "xy": True, "temperature": float(enc.rotary_emb.rope_theta)},
        pool=_pool(model, enc, classifier), class_token=False, final_norm="none",
        drop=Dropouts(head=float(getattr(getattr(model, "head_drop", None), "p", 0.0)), attn=float(attn_drop),
                      path=float(path)),
    )
