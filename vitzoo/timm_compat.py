"""Read any timm ``VisionTransformer`` instance into a :class:`ViTSpec` and a vitzoo model.

timm describes a ViT with ~40 constructor flags and module classes; vitzoo with one spec. This
module translates by looking at the built instance (module types, norm eps, parameter shapes,
``global_pool``...), never at the model's name, so models built with non-default keyword
arguments translate as well as registered ones. What vitzoo cannot express raises a ``ValueError``
naming the attribute and the timm argument behind it.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import (
    Attention,
    AttentionPoolLatent,
    DiffAttention,
    GluMlp,
    HybridEmbed,
    LayerScale,
    Mlp,
    PatchEmbed,
    RmsNorm,
    SwiGLU,
)
from timm.models.vision_transformer import Block, ParallelScalingBlock, ParallelThingsBlock, ResPostBlock
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from vitzoo.blocks.patch import HYBRID_STEMS
from vitzoo.migrate import ACTIVATIONS, GATED_MLPS, PLAIN_MLPS
from vitzoo.spec import Dropouts, ViTSpec
from vitzoo.vit import VisionTransformer

POOLS = {"token": "token", "avg": "avg", "max": "max", "avgmax": "avgmax", "map": "map", "": "none"}
ATTENTIONS = {Attention: "mhsa", DiffAttention: "diff"}
BLOCKS = {
    Block: "prenorm", ResPostBlock: "respost", ParallelThingsBlock: "parallel2",
    ParallelScalingBlock: "parallel_scaling",
}
CFG_KEYS = ("hf_hub_id", "mean", "std", "crop_pct", "interpolation")


def refuse(attr: str, found: str, argument: str) -> ValueError:
    return ValueError(
        f"from_timm: {attr} is {found}, which vitzoo cannot express (timm argument {argument!r}); "
        f"build the timm model without it, or add a vitzoo block for it (see README 'Adding a block')"
    )


def _present(module: nn.Module | None) -> bool:
    return module is not None and not isinstance(module, nn.Identity)


def _norm_kind(attr: str, norm: nn.Module) -> tuple[str, float]:
    """(ViTSpec.norm, eps) of one norm module."""
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None:
        return "layernorm", float(norm.eps)
    if isinstance(norm, (RmsNorm, nn.RMSNorm)) and norm.weight is not None:
        return "rmsnorm", float(norm.eps or 1e-6)
    raise refuse(attr, type(norm).__name__, "norm_layer")


def _activation(attr: str, act: nn.Module) -> str:
    name = type(act).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    if name not in ACTIVATIONS:
        raise refuse(attr, name, "act_layer")
    return ACTIVATIONS[name]


def _mlp(attr: str, mlp: nn.Module) -> tuple[str, int, bool]:
    """(MLP table entry, hidden width as timm computes it from mlp_ratio, bias) of one MLP."""
    act = _activation(f"{attr}.act", mlp.act)
    if type(mlp) is Mlp and isinstance(mlp.fc1, nn.Linear) and act in PLAIN_MLPS:
        return PLAIN_MLPS[act], mlp.fc1.out_features, mlp.fc1.bias is not None
    if type(mlp) is SwiGLU and act in GATED_MLPS:
        return GATED_MLPS[act], mlp.fc1_g.out_features, mlp.fc1_g.bias is not None
    if type(mlp) is GluMlp and act == "silu" and not mlp.gate_last and isinstance(mlp.fc1, nn.Linear):
        return "swiglu_packed", mlp.fc1.out_features, mlp.fc1.bias is not None
    raise refuse(attr, f"{type(mlp).__name__} with {type(mlp.act).__name__}", "mlp_layer")


def mlp_ratio_for(hidden: int, dim: int) -> float:
    """A short decimal ``r`` with ``int(dim * r) == hidden``: timm's rule for the MLP width."""
    for digits in range(8):
        for offset in (0.0, 0.1, 0.5):
            ratio = round((hidden + offset) / dim, digits)
            if ratio > 0 and int(dim * ratio) == hidden:
                return ratio
    raise ValueError(f"no mlp_ratio gives hidden width {hidden} for embed_dim {dim}")


def _signature(module: nn.Module) -> tuple:
    """Module types and parameter shapes: what identifies a CNN stem (timm builds it from flags)."""
    shapes = tuple((k, tuple(v.shape)) for k, v in module.state_dict().items())
    return tuple(type(m).__name__ for m in module.modules()), shapes


def _patch_embed(pe: nn.Module, in_chans: int) -> tuple[str, int]:
    """(ViTSpec.patch_embed, patch_size in pixels) of timm's patch embedding."""
    conv = pe.proj
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size != conv.stride or conv.padding != (0, 0):
        raise refuse("patch_embed.proj", f"{type(conv).__name__} (not a patch-sized conv)", "embed_layer")
    if conv.kernel_size[0] != conv.kernel_size[1]:
        raise refuse("patch_embed.proj", f"a {conv.kernel_size} kernel (not square)", "patch_size")
    if type(pe) is PatchEmbed:
        return "linear", conv.kernel_size[0]
    if type(pe) is HybridEmbed:
        with torch.device("meta"):
            for name, factory in HYBRID_STEMS.items():
                stem = factory.keywords
                if _signature(stem["backbone"](in_chans)) == _signature(pe.backbone):
                    return name, stem["reduction"] * conv.kernel_size[0]
    stem = type(getattr(pe, "backbone", pe)).__name__
    raise refuse("patch_embed", f"{type(pe).__name__} with {stem}", "embed_layer")


def _scaling_block(where: str, block: ParallelScalingBlock, dim: int) -> dict[str, Any]:
    """The spec fields of ViT-22B's fused parallel block (vitzoo's ``parallel_scaling``)."""
    if block.out_proj is not None:
        raise refuse(f"{where}.out_proj", "one fused output projection", "fuse_out_proj")
    act, hidden = _activation(f"{where}.mlp_act", block.mlp_act), block.in_split[0]
    if act not in PLAIN_MLPS:
        raise refuse(f"{where}.mlp_act", type(block.mlp_act).__name__, "act_layer")
    proj_bias = block.attn_out_proj.bias is not None
    return {
        "block": "parallel_scaling", "attn": "mhsa", "mlp": PLAIN_MLPS[act], "num_heads": block.num_heads,
        "mlp_ratio": mlp_ratio_for(hidden, dim), "qkv_bias": block.in_proj.bias is not None,
        "qk_norm": _present(block.q_norm), "proj_bias": proj_bias, "attn_inner_norm": False,
        "mlp_inner_norm": False, "layer_scale": block.ls.init_values if _present(block.ls) else None,
        "attn_drop_rate": float(block.attn_drop.p), "proj_drop_rate": float(block.mlp_drop.p),
        "drop_path_rate": float(getattr(block.drop_path, "drop_prob", 0.0)),
    }


def _block(i: int, block: nn.Module, dim: int) -> dict[str, Any]:
    """The spec fields one encoder block implies; every block of a model must agree on all but slots."""
    where = f"blocks.{i}"
    if type(block) not in BLOCKS:
        raise refuse(where, type(block).__name__, "block_fn")
    if type(block) is ParallelScalingBlock:
        return _scaling_block(where, block, dim)
    if type(block) is ParallelThingsBlock:
        if block.num_parallel != 2:
            raise refuse(where, f"ParallelThingsBlock with {block.num_parallel} branches", "num_parallel")
        attn, block_mlp = block.attns[0].attn, block.ffns[0].mlp
        ls, drop_path = [block.attns[0].ls, block.ffns[0].ls], block.attns[0].drop_path
    else:
        attn, block_mlp = block.attn, block.mlp
        ls = [getattr(block, name, nn.Identity()) for name in ("ls1", "ls2")]
        drop_path = getattr(block, "drop_path1", nn.Identity())
    if type(attn) not in ATTENTIONS or getattr(attn, "dual_lambda", False):
        raise refuse(f"{where}.attn", type(attn).__name__, "attn_layer")
    mlp, hidden, mlp_bias = _mlp(f"{where}.mlp", block_mlp)
    proj_bias = attn.proj.bias is not None
    if mlp_bias != proj_bias:
        raise refuse(f"{where}.mlp", f"bias={mlp_bias} with attn.proj bias={proj_bias}", "proj_bias")
    if any(_present(m) and type(m) is not LayerScale for m in ls) or _present(ls[0]) != _present(ls[1]):
        raise refuse(f"{where}.ls1/ls2", "an unpaired or custom layer scale", "init_values")
    return {
        "block": BLOCKS[type(block)], "attn": ATTENTIONS[type(attn)], "mlp": mlp, "num_heads": attn.num_heads,
        "mlp_ratio": mlp_ratio_for(hidden, dim), "qkv_bias": attn.qkv.bias is not None,
        "qk_norm": _present(attn.q_norm), "proj_bias": proj_bias, "attn_inner_norm": _present(attn.norm),
        "mlp_inner_norm": _present(block_mlp.norm), "layer_scale": ls[0].init_values if _present(ls[0]) else None,
        "attn_drop_rate": float(attn.attn_drop.p), "proj_drop_rate": float(attn.proj_drop.p),
        "drop_path_rate": float(getattr(drop_path, "drop_prob", 0.0)),
    }


def _per_layer(values: list[str]) -> str | tuple[str, ...]:
    return values[0] if len(set(values)) == 1 else tuple(values)


def _norms(model: TimmViT) -> dict[str, nn.Module]:
    """Every norm module of the model by its attribute path (vitzoo uses one kind and eps for all)."""
    return {
        name: m for name, m in model.named_modules()
        if "norm" in type(m).__name__.lower() and not name.startswith("patch_embed.backbone")
        and not name.endswith("attn.sub_norm")  # differential attention's own RMSNorm, fixed in its block
    }


def _pool(model: TimmViT, layers: dict[str, Any]) -> str:
    if model.global_pool not in POOLS:
        raise refuse("global_pool", repr(model.global_pool), "global_pool")
    pool = POOLS[model.global_pool]
    if pool != "map":
        return pool
    ap, dim = model.attn_pool, model.embed_dim
    if type(ap) is not AttentionPoolLatent:
        raise refuse("attn_pool", type(ap).__name__, "global_pool")
    plain = ap.latent_len == 1 and ap.latent.shape[-1] == dim and ap.pos_embed is None and ap.pool == "token"
    if not plain or _present(ap.q_norm) or ap.q.bias is None or ap.num_heads != layers["num_heads"]:
        raise refuse("attn_pool", "a non-default AttentionPoolLatent", "global_pool='map'")
    mlp, hidden, _ = _mlp("attn_pool.mlp", ap.mlp)
    if mlp != _per_layer(layers["mlp"]) or hidden != int(dim * layers["mlp_ratio"]):
        raise refuse("attn_pool.mlp", f"{mlp} of width {hidden} unlike the blocks' MLP", "mlp_layer")
    return pool


def can_read(model: nn.Module) -> bool:
    """Whether :func:`from_timm` knows ``model``'s class (it may still refuse a setting of the instance)."""
    from vitzoo.timm_families import READERS

    return isinstance(model, (TimmViT, *READERS))


def spec_from_timm(model: nn.Module) -> ViTSpec:
    """The :class:`ViTSpec` of a built timm ``VisionTransformer`` (or DeiT ``VisionTransformerDistilled``), or of
    an instance of a class :mod:`vitzoo.timm_families` reads."""
    from vitzoo.timm_families import READERS  # the family readers use this module's helpers

    reader = next((READERS[cls] for cls in type(model).__mro__ if cls in READERS), None)
    if reader is not None:
        return reader(model)
    if not isinstance(model, TimmViT):
        known = ", ".join(sorted(cls.__name__ for cls in (TimmViT, *READERS)))
        raise ValueError(f"from_timm reads timm's {known} models, got {type(model).__name__}; "
                         f"other timm families (Eva, Swin, ...) are different architectures")
    pe, dim = model.patch_embed, model.embed_dim
    patch_embed, patch = _patch_embed(pe, model.in_chans)
    conv = pe.proj
    pad = bool(pe.dynamic_img_pad)  # timm pads images up to whole patches; so can vitzoo
    crop = any(side % patch for side in pe.img_size) and not pad  # else timm's patch conv drops the remainder
    if crop and type(pe) is not PatchEmbed:
        raise refuse("patch_embed.img_size", f"{tuple(pe.img_size)}, not a multiple of the stem stride {patch}",
                      "img_size")
    blocks = [_block(i, b, dim) for i, b in enumerate(model.blocks)]
    fixed = {k: v for k, v in blocks[0].items() if k not in ("block", "attn", "mlp", "drop_path_rate")}
    for i, fields in enumerate(blocks):
        for key, value in fixed.items():
            if fields[key] != value:
                raise refuse(f"blocks.{i}", f"{key}={fields[key]!r} unlike blocks.0 ({value!r})", key)
    layers = {**fixed, **{slot: [b[slot] for b in blocks] for slot in ("block", "attn", "mlp")}}
    kinds = {name: _norm_kind(name, m) for name, m in _norms(model).items()}
    first = next(iter(kinds.items()))
    for name, kind in kinds.items():
        if kind != first[1]:
            raise refuse(name, f"{kind[0]}(eps={kind[1]}) while {first[0]} is {first[1][0]}(eps={first[1][1]})",
                          "norm_layer")
    pool = _pool(model, layers)
    has_dist = getattr(model, "dist_token", None) is not None
    final_norm = "pooled" if _present(model.fc_norm) else "tokens" if _present(model.norm) else "none"
    if final_norm == ("pooled" if pool in ("avg", "max", "avgmax") else "tokens"):
        final_norm = "auto"  # where timm puts it for this pooling by default
    patch_drop = getattr(model.patch_drop, "prob", 0.0)
    attn_options = {"qkv_bias": layers["qkv_bias"], "qk_norm": layers["qk_norm"], "proj_bias": layers["proj_bias"],
                    "inner_norm": layers["attn_inner_norm"]}
    pool_options = {} if pool == "token" else {"include_prefix": model.pool_include_prefix}
    return ViTSpec(
        img_size=tuple(pe.img_size), patch_size=patch, in_chans=model.in_chans, crop_remainder=crop,
        patch_embed={"name": patch_embed, "bias": conv.bias is not None, "norm": _present(getattr(pe, "norm", None)),
                     "pad": pad},
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        embed_dim=dim, depth=len(model.blocks), num_heads=layers["num_heads"], mlp_ratio=layers["mlp_ratio"],
        pos_embed={"name": "learned", "prefix": not model.no_embed_class} if model.pos_embed is not None else "none",
        mlp={"name": _per_layer(layers["mlp"]), "bias": layers["proj_bias"], "inner_norm": layers["mlp_inner_norm"]},
        attn={"name": _per_layer(layers["attn"]), **attn_options},
        norm={"name": first[1][0], "eps": first[1][1]},
        block={"name": _per_layer(layers["block"]), "layer_scale": layers["layer_scale"]},
        pool={"name": pool, **pool_options},
        class_token=model.cls_token is not None, dist_token=has_dist, reg_tokens=model.num_reg_tokens,
        pre_norm=_present(model.norm_pre), final_norm=final_norm,
        dynamic_img_size=bool(model.dynamic_img_size),
        drop=Dropouts(head=float(model.head_drop.p), pos=float(model.pos_drop.p), patch=float(patch_drop),
                      attn=layers["attn_drop_rate"], proj=layers["proj_drop_rate"], path=blocks[-1]["drop_path_rate"]),
    )


def pretrained_cfg_from_timm(model: nn.Module) -> dict[str, Any]:
    """Where a timm model's default weights live and how its inputs are preprocessed."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    out = {key: cfg[key] for key in CFG_KEYS if cfg.get(key) is not None}
    return {key: list(v) if isinstance(v, tuple) else v for key, v in out.items()}


def from_timm(model: nn.Module) -> VisionTransformer:
    """The vitzoo twin of a built timm ViT: same spec, timm's weights loaded with ``strict=True``.

    Works on any device, ``meta`` included (the twin then shares nothing and holds no data).
    """
    spec = spec_from_timm(model)
    ref = next(model.parameters())
    with torch.device(ref.device):
        ours = VisionTransformer(spec, pretrained_cfg=pretrained_cfg_from_timm(model)).to(ref.dtype)
    ours.load_state_dict(model.state_dict(), strict=True, assign=ref.is_meta)
    return ours.train(model.training)
