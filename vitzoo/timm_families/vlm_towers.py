"""Reader of timm's VLM vision towers: ``Qwen3VitEncoder`` / ``Qwen3VitClassifier`` (Qwen3-VL, Qwen3.5) and
``DeepseekVitEncoder`` / ``DeepseekVitClassifier`` (DeepSeek-V4). A classifier wraps the encoder as ``encoder``
(vitzoo: the readout's ``checkpoint_prefix="encoder."``) and reads the mean of its tokens through a parameter-free norm
(``pool="avg_norm"``); the VLM projector (``merger`` / ``aligner``) is a readout entry of the same names.
"""

from __future__ import annotations

from typing import Any

from timm.layers import AttentionRope, DropPath, RotaryEmbeddingCat
from timm.layers.norm import RmsNormFp32
from timm.models.deepseek_vit import DeepseekVitClassifier, DeepseekVitEncoder
from timm.models.qwen3_vit import Qwen3VitClassifier, Qwen3VitEncoder
from torch import nn

from vitzoo.blocks.projector import TIMM_GLOBAL_POOLS, encoder_readout
from vitzoo.spec import Dropouts, ViTSpec
from vitzoo.timm_compat import _activation, _mlp, _norm_kind, _patch_embed, _present, mlp_ratio_for, refuse

TIMM_CLASSES = (Qwen3VitEncoder, Qwen3VitClassifier, DeepseekVitEncoder, DeepseekVitClassifier)
TIMM_CLASS = TIMM_CLASSES[0]


def _norm(attr: str, norm: nn.Module) -> tuple[str, float]:
    """(norm entry, eps); timm's ``RmsNormFp32`` is vitzoo's ``rmsnorm`` (the same in fp32)."""
    if isinstance(norm, RmsNormFp32) and norm.weight is not None:
        return "rmsnorm", float(norm.eps)
    return _norm_kind(attr, norm)


def _free_norm(attr: str, norm: nn.Module, kind: tuple[str, float]) -> None:
    """Refuse a classifier norm that is not the blocks' norm without parameters (what ``avg_norm`` applies)."""
    found = "LayerNorm" if isinstance(norm, nn.LayerNorm) else "rmsnorm" if isinstance(norm, RmsNormFp32) else ""
    params = any(True for _ in norm.parameters())
    if not _present(norm) or params or found.lower() != kind[0] or float(norm.eps) != kind[1]:
        raise refuse(attr, f"{type(norm).__name__}{' with parameters' if params else ''}, not the blocks' "
                     f"{kind[0]}(eps={kind[1]}) without parameters", "final_norm")


def _rope(rope: nn.Module, head_dim: int) -> dict[str, Any]:
    if type(rope) is not RotaryEmbeddingCat or not rope.rotate_half or rope.in_pixels or rope.dim != head_dim:
        raise refuse("rope", f"{type(rope).__name__} (not rotate-half axial RoPE on patch indices)", "rope")
    if rope.ref_feat_shape is not None or rope.grid_offset or rope.aug_active:
        raise refuse("rope", "RoPE with rescaled, offset or augmented positions", "rope")
    return {"name": "axial_half", "temperature": float(rope.temperature)}


def _attn(i: int, attn: nn.Module, dim: int) -> dict[str, Any]:
    if type(attn) is not AttentionRope or attn.qkv is None or _present(attn.q_norm) or _present(attn.norm):
        raise refuse(f"blocks.{i}.attn", f"{type(attn).__name__} (not fused-qkv RoPE attention)", "attn_layer")
    if abs(attn.scale - attn.head_dim**-0.5) > 1e-12:
        raise refuse(f"blocks.{i}.attn.scale", f"{attn.scale}", "scale")
    return {"qkv_bias": attn.qkv.bias is not None, "proj_bias": attn.proj.bias is not None}


def _projector(enc: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """(entry, options) of the tower's VLM projector, None without one."""
    merger, aligner = getattr(enc, "merger", None), getattr(enc, "aligner", None)
    if merger is not None:
        _activation("merger.act", merger.act)
        if getattr(merger.act, "approximate", "none") != "none":
            raise refuse("merger.act", "GELU(tanh)", "act_layer")
        out = merger.fc2.out_features if isinstance(merger.fc2, nn.Linear) else 0
        return "merger", {"cell": merger.merge_size, "out_features": out}
    if aligner is not None:
        if type(aligner.act) is not nn.GELU or aligner.act.approximate != "none":
            raise refuse("aligner.act", type(aligner.act).__name__, "act_layer")
        return "aligner", {"cell": aligner.downsample_ratio, "out_features": aligner.out_features}
    return None


def spec(model: nn.Module) -> ViTSpec:
    """The :class:`ViTSpec` of a built Qwen3 / DeepSeek vision encoder or classifier."""
    classifier = isinstance(model, (Qwen3VitClassifier, DeepseekVitClassifier))
    enc = model.encoder if classifier else model
    dim, blocks = enc.embed_dim, enc.blocks
    patch_embed, patch = _patch_embed(enc.patch_embed, enc.in_chans)
    if enc.patch_embed.dynamic_img_pad:
        raise refuse("patch_embed.dynamic_img_pad", "True", "dynamic_img_pad")
    num_heads = blocks[0].attn.num_heads
    kind = _norm("blocks.0.norm1", blocks[0].norm1)
    attn = _attn(0, blocks[0].attn, dim)
    mlp, hidden, mlp_bias = _mlp("blocks.0.mlp", blocks[0].mlp)
    for i, block in enumerate(blocks):
        for name in ("norm1", "norm2"):
            if _norm(f"blocks.{i}.{name}", getattr(block, name)) != kind:
                raise refuse(f"blocks.{i}.{name}", "a norm unlike blocks.0.norm1", "norm_layer")
        if _attn(i, block.attn, dim) != attn or _mlp(f"blocks.{i}.mlp", block.mlp) != (mlp, hidden, mlp_bias):
            raise refuse(f"blocks.{i}", "attention or MLP unlike blocks.0", "depth")
    if _present(getattr(enc, "norm", None)) and _norm("norm", enc.norm) != kind:
        raise refuse("norm", "a norm unlike the blocks'", "norm_layer")
    # Qwen's learned table keeps its own grid whatever the image size, resized in forward as Qwen resizes it
    position = "none" if getattr(enc, "pos_embed", None) is None else {
        "name": "learned", "resample": "bilinear_corners", "table_grid": (enc.pos_embed_grid_size,) * 2}
    projector = _projector(enc)
    if classifier:
        if model.global_pool not in TIMM_GLOBAL_POOLS:
            raise refuse("global_pool", repr(model.global_pool), "global_pool")
        mean, prefix = TIMM_GLOBAL_POOLS[model.global_pool], {"checkpoint_prefix": "encoder."}
        if projector is None and not _present(model.norm):  # final_norm=False: the plain mean
            pool: dict[str, Any] = {"name": "avg_norm", "norm": False, "grid": True, "mean": mean, **prefix}
        else:
            _free_norm("norm", model.norm, kind)
            pool = {"name": "avg_norm", "grid": True, "mean": mean, **prefix} if projector is None else {
                "name": projector[0], **projector[1], "readout": "avg_norm" if mean else "norm", **prefix}
    elif projector is not None:
        pool = {"name": projector[0], **projector[1], "readout": "none"}
    elif enc.global_pool in TIMM_GLOBAL_POOLS:
        pool = encoder_readout(TIMM_GLOBAL_POOLS[enc.global_pool])
    else:
        raise refuse("global_pool", repr(enc.global_pool), "global_pool")
    path = blocks[-1].drop_path1.drop_prob if isinstance(blocks[-1].drop_path1, DropPath) else 0.0
    head = getattr(model, "head", None)
    return ViTSpec(
        img_size=tuple(enc.patch_embed.img_size), patch_size=patch, in_chans=enc.in_chans,
        patch_embed={"name": patch_embed, "bias": enc.patch_embed.proj.bias is not None},
        num_classes=head.out_features if isinstance(head, nn.Linear) else 0,
        embed_dim=dim, depth=len(blocks), num_heads=num_heads, mlp_ratio=mlp_ratio_for(hidden, dim),
        pos_embed=position, rope=_rope(enc.rope, dim // num_heads),
        attn={"name": "mhsa", **attn}, mlp={"name": mlp, "bias": mlp_bias},
        norm={"name": kind[0], "eps": kind[1]}, pool=pool, class_token=False,
        final_norm="tokens" if _present(getattr(enc, "norm", None)) else "none",
        drop=Dropouts(head=float(getattr(getattr(model, "head_drop", None), "p", 0.0)),
                      attn=float(blocks[0].attn.attn_drop.p), proj=float(blocks[0].attn.proj_drop.p),
                      path=float(path)),
    )
