"""timm's ``MlpMixer``: MLP-Mixer, gMixer, ResMLP and gMLP (see ``registry/mixer.toml``).

The token mixer of each block becomes an ``attn`` entry (``token_mlp``, ``token_glu``, ``token_linear``, ``none``)
and the block one of ``mixer``, ``resmlp``, ``gmlp``; the patch embedding is stored as timm's ``stem``.
"""

from __future__ import annotations

from typing import Any

from timm.layers import GatedMlp, GluMlp, Mlp
from timm.models.mlp_mixer import Affine, MixerBlock, MlpMixer, ResBlock, SpatialGatingBlock, SpatialGatingUnit
from torch import nn

from vitzoo.spec import Dropouts, ViTSpec
from vitzoo.timm_compat import _activation, _mlp, _norm_kind, _patch_embed, _present, mlp_ratio_for, refuse

TIMM_CLASS = MlpMixer
BLOCKS = {MixerBlock: "mixer", ResBlock: "resmlp", SpatialGatingBlock: "gmlp"}
POOLS = {"avg": "avg", "": "none"}
RESMLP_LAYER_SCALE = 1e-4  # timm's ResBlock default, for an instance on the meta device (its values unreadable)


def _norm(attr: str, norm: nn.Module) -> dict[str, Any]:
    """The ``norm`` slot value of one norm module (ResMLP's Affine included)."""
    if type(norm) is Affine:
        return {"name": "affine"}
    kind, eps = _norm_kind(attr, norm)
    return {"name": kind, "eps": eps}


def _glu(attr: str, mlp: GluMlp) -> None:
    """Refuse a GluMlp unlike gMixer's: gate second, SiLU, no inner norm."""
    if not mlp.gate_last or _activation(f"{attr}.act", mlp.act) != "silu" or _present(mlp.norm):
        raise refuse(attr, f"GluMlp with {type(mlp.act).__name__}, gate_last={mlp.gate_last}", "act_layer")


def _token_mixer(where: str, block: nn.Module, dim: int, tokens: int) -> dict[str, Any]:
    """The ``attn`` slot value of one block's token mixing."""
    if type(block) is SpatialGatingBlock:
        return {"name": "none"}
    if type(block) is ResBlock:
        return {"name": "token_linear"}
    mlp, attr = block.mlp_tokens, f"{where}.mlp_tokens"
    if mlp.fc1.in_features != tokens:
        raise refuse(attr, f"sized for {mlp.fc1.in_features} tokens, not the stem's {tokens}", "img_size")
    ratio = mlp_ratio_for(mlp.fc1.out_features, dim)
    if type(mlp) is GluMlp:
        _glu(attr, mlp)
        return {"name": "token_glu", "ratio": ratio}
    if type(mlp) is not Mlp or _activation(f"{attr}.act", mlp.act) != "gelu" or _present(mlp.norm):
        raise refuse(attr, f"{type(mlp).__name__} with {type(mlp.act).__name__} (token_mlp is GELU)", "act_layer")
    return {"name": "token_mlp", "ratio": ratio}


def _channel_mlp(where: str, block: nn.Module, dim: int) -> tuple[dict[str, Any], float]:
    """The ``mlp`` slot value and mlp_ratio of one block's channel MLP."""
    mlp, attr = block.mlp_channels, f"{where}.mlp_channels"
    if type(block) is SpatialGatingBlock:
        plain = type(mlp) is GatedMlp and type(mlp.gate) is SpatialGatingUnit and not _present(mlp.norm)
        if not plain or _activation(f"{attr}.act", mlp.act) != "gelu":
            raise refuse(attr, f"{type(mlp).__name__} with {type(mlp.act).__name__}", "mlp_layer")
        return {"name": "spatial_gating"}, mlp_ratio_for(mlp.fc1.out_features, dim)
    if type(mlp) is GluMlp:
        _glu(attr, mlp)
        return {"name": "swiglu_packed", "gate_last": True}, mlp_ratio_for(mlp.fc1.out_features, dim)
    name, hidden, bias = _mlp(attr, mlp)
    return {"name": name, "bias": bias, "inner_norm": _present(mlp.norm)}, mlp_ratio_for(hidden, dim)


def _block(i: int, block: nn.Module, dim: int, tokens: int) -> dict[str, Any]:
    """The spec fields one block implies; every block of the model must give the same."""
    where = f"blocks.{i}"
    if type(block) not in BLOCKS:
        raise refuse(where, type(block).__name__, "block_layer")
    if _present(block.drop_path):
        raise refuse(f"{where}.drop_path", "the same rate in every block, while vitzoo's rises linearly",
                     "drop_path_rate")
    mlp, ratio = _channel_mlp(where, block, dim)
    fields = {"attn": _token_mixer(where, block, dim, tokens), "mlp": mlp, "mlp_ratio": ratio,
              "block": {"name": BLOCKS[type(block)]}, "proj_drop": float(block.mlp_channels.drop1.p)}
    if type(block) is ResBlock:
        ls = block.ls1
        scale = RESMLP_LAYER_SCALE if ls.is_meta else float(ls.detach()[0])
        fields["block"]["layer_scale"] = scale
        if block.linear_tokens.in_features != tokens:
            raise refuse(f"{where}.linear_tokens", f"sized for {block.linear_tokens.in_features} tokens", "img_size")
    norms = ("norm",) if type(block) is SpatialGatingBlock else ("norm1", "norm2")
    fields["norms"] = [_norm(f"{where}.{n}", getattr(block, n)) for n in norms]
    return fields


def spec(model: MlpMixer) -> ViTSpec:
    """The :class:`ViTSpec` of a built timm ``MlpMixer``."""
    stem, dim = model.stem, model.embed_dim
    patch_embed, patch = _patch_embed(stem, model.in_chans)
    if stem.dynamic_img_pad or not stem.strict_img_size:
        raise refuse("stem", "a patch embedding for any image size", "img_size")
    if model.global_pool not in POOLS:
        raise refuse("global_pool", repr(model.global_pool), "global_pool")
    blocks = [_block(i, b, dim, stem.num_patches) for i, b in enumerate(model.blocks)]
    for i, fields in enumerate(blocks):
        for key, value in blocks[0].items():
            if fields[key] != value:
                raise refuse(f"blocks.{i}", f"{key}={fields[key]!r} unlike blocks.0 ({value!r})", key)
    norm = _norm("norm", model.norm)
    for attr, found in [("norm", norm), *(("blocks.0", n) for n in blocks[0]["norms"])]:
        if found != norm:
            raise refuse(attr, f"{found} while norm is {norm}", "norm_layer")
    if _present(stem.norm) and _norm("stem.norm", stem.norm) != norm:
        raise refuse("stem.norm", "unlike the other norms", "norm_layer")
    first = blocks[0]
    return ViTSpec(
        img_size=tuple(stem.img_size), patch_size=patch, in_chans=model.in_chans,
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        embed_dim=dim, depth=len(model.blocks), num_heads=1, mlp_ratio=first["mlp_ratio"],
        patch_embed={"name": patch_embed, "stored_as": "stem", "bias": stem.proj.bias is not None,
                     "norm": _present(stem.norm)},
        pos_embed="none", class_token=False, pool=POOLS[model.global_pool], final_norm="tokens",
        attn=first["attn"], mlp=first["mlp"], norm=norm, block=first["block"],
        drop=Dropouts(head=float(model.head_drop.p), proj=first["proj_drop"]),
    )
