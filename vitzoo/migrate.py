"""Specs written by vitzoo 0.1, and timm's keyword arguments, read into today's spec.

vitzoo 0.1 kept every block option as a flat spec field (``qk_norm``, ``rope_temperature``,
``drop_path_rate``...); they now live on their slot (``attn.qk_norm``, ``rope.temperature``,
``drop.path``). A ``config.json``, checkpoint or run folder written then still loads: its spec is
translated on reading. timm's ``create_model`` keywords (``drop_path_rate=0.1``, ``qk_norm=True``,
``init_values=1e-5``, ``global_pool="avg"``) are the same flat names, so ``create_model`` accepts them too.
"""

from __future__ import annotations

from typing import Any

from vitzoo.blocks import SLOTS
from vitzoo.blocks.options import option_names
from vitzoo.spec import SLOT_DEFAULTS, ViTSpec

# flat field of vitzoo 0.1 -> (its default there, the dotted path it moved to)
V1_FIELDS: dict[str, tuple[Any, str]] = {
    "norm_eps": (1e-6, "norm.eps"),
    "qkv_bias": (True, "attn.qkv_bias"),
    "qk_norm": (False, "attn.qk_norm"),
    "kv_heads": (None, "attn.kv_heads"),
    "attn_inner_norm": (False, "attn.inner_norm"),
    "mlp_inner_norm": (False, "mlp.inner_norm"),
    "patch_norm": (False, "patch_embed.norm"),
    "patch_bias": (True, "patch_embed.bias"),
    "pool_include_prefix": (False, "pool.include_prefix"),
    "pool_num_heads": (None, "pool.num_heads"),
    "pool_mlp_ratio": (None, "pool.mlp_ratio"),
    "layer_scale": (None, "block.layer_scale"),
    "rope_temperature": (None, "rope.temperature"),
    "rope_ref_grid": (None, "rope.ref_grid"),
    "rope_grid_offset": (0.0, "rope.grid_offset"),
    "rope_xy": (False, "rope.xy"),
    "rope_rescale": (None, "rope.rescale"),
    "no_embed_class": (False, "pos_embed.prefix"),  # negated
    "proj_bias": (True, "attn.proj_bias"),  # and mlp.bias
    "fc_norm": (None, "final_norm"),  # with final_norm, one placement
    "drop_rate": (0.0, "drop.head"),
    "pos_drop_rate": (0.0, "drop.pos"),
    "patch_drop_rate": (0.0, "drop.patch"),
    "attn_drop_rate": (0.0, "drop.attn"),
    "proj_drop_rate": (0.0, "drop.proj"),
    "drop_path_rate": (0.0, "drop.path"),
}
# timm's own names for settings vitzoo 0.1 did not spell the same way
TIMM_ARGUMENTS = {"init_values": "layer_scale", "global_pool": "pool"}
# the keywords of timm's VisionTransformer that create_model takes as timm does
TIMM_KEYWORDS = (*TIMM_ARGUMENTS, "qkv_bias", "qk_norm", "proj_bias", "no_embed_class", "fc_norm", "final_norm",
                 "drop_rate", "pos_drop_rate", "patch_drop_rate", "attn_drop_rate", "proj_drop_rate", "drop_path_rate")


def flat_changes(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat settings (vitzoo 0.1 fields or timm keywords) as dotted changes for :meth:`ViTSpec.replace`;
    the keys that are neither pass through unchanged."""
    out = {key: value for key, value in flat.items() if key not in V1_FIELDS and key not in TIMM_ARGUMENTS}
    for timm_name, name in TIMM_ARGUMENTS.items():
        if timm_name in flat:
            value = flat[timm_name]
            out.update(_moved(name, "none" if name == "pool" and value == "" else value))
    for name in V1_FIELDS:
        if name in flat and name != "fc_norm":
            out.update(_moved(name, flat[name]))
    if "fc_norm" in flat or isinstance(flat.get("final_norm"), bool):
        out["final_norm"] = _final_norm(flat.get("final_norm", True), flat.get("fc_norm"))
    return out


# timm's activation classes and names -> vitzoo's name for the activation
ACTIVATIONS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "ReLU": "relu", "SiLU": "silu",
               "gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu",
               "silu": "silu", "swish": "silu"}
PLAIN_MLPS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}  # act -> MLP
GATED_MLPS = {"silu": "swiglu", "gelu": "geglu"}
# timm keywords that choose how timm builds its layers for TorchScript or ONNX; vitzoo's modules are the same
# either way (torch.jit.script traces them, export goes through torch.export), so they change nothing here
NO_EFFECT = ("scriptable", "exportable", "no_jit")
# timm's names of position embeddings -> vitzoo's entries
TIMM_POS_EMBEDS = {"learn": "learned", "": "none"}
# vitzoo's and timm's (``use_naflex``) keyword for a model that takes images at their own size and aspect ratio
NAFLEX_KEYWORDS = ("naflex", "use_naflex")
# timm keywords that take module classes; vitzoo chooses those parts by name in a slot
LAYER_CLASSES = {"embed_layer": "patch_embed", "block_fn": "block", "mlp_layer": "mlp", "attn_layer": "attn",
                 "embed_norm_layer": "patch_embed.norm"}
NORM_CLASSES = {"LayerNorm": "layernorm", "RmsNorm": "rmsnorm", "RMSNorm": "rmsnorm"}


def timm_keywords(overrides: dict[str, Any], mlp: str = "gelu") -> dict[str, Any]:
    """``create_model`` keywords with timm's names (``drop_path_rate=0.1``, ``act_layer="quick_gelu"``) as spec
    changes (``drop.path``, ``mlp``); ``mlp`` is the MLP entry an ``act_layer`` changes. What timm can build and
    vitzoo cannot express is refused, naming the keyword."""
    overrides = dict(overrides)
    for name in NO_EFFECT:
        overrides.pop(name, None)
    refused = {k: v for k, v in overrides.items() if k in LAYER_CLASSES and v is not None}
    if refused:
        name = next(iter(refused))
        raise ValueError(f"{name}: timm's module classes are not vitzoo blocks; choose the {LAYER_CLASSES[name]} by "
                         f"name instead ({LAYER_CLASSES[name]}=...; docs/blocks.md lists every block)")
    for name in LAYER_CLASSES:
        overrides.pop(name, None)
    if overrides.pop("weight_init", "") not in ("", None):
        raise ValueError("weight_init: vitzoo initialises as timm's default (weight_init=''); the jax and moco "
                         "schemes are not available; load weights with pretrained= instead")
    if overrides.pop("fix_init", False):
        raise ValueError("fix_init=True: vitzoo has no rescaled projection init; build without it")
    if "dynamic_img_pad" in overrides:
        overrides["patch_embed.pad"] = overrides.pop("dynamic_img_pad")
    for name in NAFLEX_KEYWORDS:  # every model takes patch sequences; NaFlex also means images of any size
        if overrides.pop(name, False):
            overrides["dynamic_img_size"] = True
    if "act_layer" in overrides:
        chosen = overrides.get("mlp", mlp)
        overrides["mlp"] = _mlp_for(overrides.pop("act_layer"), chosen if isinstance(chosen, str) else mlp)
    if "norm_layer" in overrides:
        norm = overrides.pop("norm_layer")
        overrides["norm"] = norm if isinstance(norm, str) else NORM_CLASSES.get(getattr(norm, "__name__", ""), norm)
    if isinstance(overrides.get("pos_embed"), str) and overrides["pos_embed"] in TIMM_POS_EMBEDS:
        overrides["pos_embed"] = TIMM_POS_EMBEDS[overrides["pos_embed"]]
    timm = {k: v for k, v in overrides.items() if k in TIMM_KEYWORDS and not (k == "final_norm" and isinstance(v, str))}
    return {**{k: v for k, v in overrides.items() if k not in timm}, **flat_changes(timm)}


def _mlp_for(act_layer: Any, mlp: str) -> str:
    """The MLP entry of kind ``mlp`` (plain or gated) with timm's activation ``act_layer`` (a name or class)."""
    act = ACTIVATIONS.get(act_layer if isinstance(act_layer, str) else getattr(act_layer, "__name__", ""))
    table = GATED_MLPS if mlp in GATED_MLPS.values() else PLAIN_MLPS
    if act not in table:
        raise ValueError(f"act_layer={act_layer!r}: the {mlp!r} MLP has no variant with that activation; "
                         f"valid: {', '.join(table)}; or choose an MLP by name (mlp=...; docs/blocks.md lists them)")
    return table[act]


def _moved(name: str, value: Any) -> dict[str, Any]:
    if name == "no_embed_class":
        return {"pos_embed.prefix": not value}
    if name == "proj_bias":
        return {"attn.proj_bias": value, "mlp.bias": value}
    if name == "pool":
        return {"pool": value}
    return {V1_FIELDS[name][1]: value}


def _final_norm(final_norm: bool, fc_norm: bool | None) -> str:
    if not final_norm:
        return "none"
    return "auto" if fc_norm is None else "pooled" if fc_norm else "tokens"


def spec_from_saved(data: dict[str, Any]) -> ViTSpec:
    """The spec of a file's ``spec`` table, written by this vitzoo or by vitzoo 0.1 (flat fields). A 0.1
    field left at its default is dropped when today's entry has no such option (0.1 wrote every field)."""
    if not any(key in V1_FIELDS for key in data) and not isinstance(data.get("final_norm"), bool):
        return ViTSpec.from_dict(data)
    defaults = {name: default for name, (default, _) in V1_FIELDS.items()}
    kept = {k: v for k, v in data.items() if k not in defaults or v != defaults[k] or _declared(data, k)}
    kept.setdefault("final_norm", True)
    return ViTSpec.from_dict(flat_changes(kept))


def _declared(data: dict[str, Any], name: str) -> bool:
    """Whether the entry a 0.1 spec chose for the slot of ``name`` has that option today."""
    path = V1_FIELDS[name][1]
    slot, _, option = path.partition(".")
    if slot not in SLOTS:
        return True
    entry = data.get(slot, SLOT_DEFAULTS[slot].name)
    entries = entry if isinstance(entry, list | tuple) else [entry]
    table = SLOTS[slot]
    return all(e in table and option in option_names(table.options_class(e)) for e in entries)
