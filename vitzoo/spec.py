"""The one description of a Vision Transformer: every architectural choice is a field here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vitzoo.blocks import SLOTS
from vitzoo.errors import did_you_mean
from vitzoo.fields import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, RATE, Range, check_fields, field_types, parse_text

LayerChoice = str | tuple[str, ...]

PER_LAYER_SLOTS = ("attn", "mlp", "block")
# What a command-line value may be when its field is not known.
UNKNOWN_FIELD = bool | int | float | str | None | tuple[bool | int | float | str | None, ...]


@dataclass(frozen=True)
class ViTSpec:
    """Everything that makes two Vision Transformers different.

    Slot fields name entries of the block tables in :mod:`vitzoo.blocks`; ``attn``, ``mlp`` and
    ``block`` also take one name per layer. Specs are plain data: they round-trip through
    :meth:`to_dict` / :meth:`from_dict` (and so TOML), and checkpoints carry them.
    """

    # input and output
    img_size: tuple[int, int] = (224, 224)  # (H, W) the position table is laid out for
    patch_size: int = 16  # square patch side in pixels
    in_chans: int = 3  # image channels
    num_classes: int = 1000  # classifier outputs; 0 means no head (pooled features out)
    crop_remainder: bool = False  # drop pixels past the last whole patch instead of refusing (timm so400m/14 at 384)
    # width and depth
    embed_dim: int = 768  # token width
    depth: int = 12  # number of encoder blocks
    num_heads: int = 12  # attention heads per block
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim
    # block choices, by name in the slot tables
    patch_embed: str = "linear"  # image -> patch tokens
    pos_embed: str = "learned"  # learned | sincos2d | none
    attn: LayerChoice = "mhsa"  # token mixer, one name or one per layer
    mlp: LayerChoice = "gelu"  # channel mixer, one name or one per layer
    norm: str = "layernorm"  # every norm in the model
    block: LayerChoice = "prenorm"  # residual wiring, one name or one per layer
    pool: str = "token"  # readout: token | avg | max | avgmax | map | none
    rope: str = "none"  # rotary positions on q/k inside attention: none | axial (EVA-02) | dinov3
    # prefix tokens
    class_token: bool = True  # learned [CLS] token in front
    dist_token: bool = False  # DeiT distillation token after [CLS], read by a second head
    reg_tokens: int = 0  # register tokens after the class/distillation tokens
    no_embed_class: bool = False  # position table covers patch tokens only, not prefix tokens
    # details
    norm_eps: float = 1e-6  # epsilon of every norm (timm 1e-6; CLIP 1e-5)
    qkv_bias: bool = True  # bias on the fused qkv projection
    qk_norm: bool = False  # normalize q and k per head (ViT-22B)
    kv_heads: int | tuple[int, ...] | None = None  # key/value heads of attn='gqa', one or per layer; None: num_heads
    proj_bias: bool = True  # bias on the attention output projection and the MLP layers (AIMv2 has none)
    attn_inner_norm: bool = False  # norm before the attention output projection (Sub-LN, BEiT-3)
    mlp_inner_norm: bool = False  # norm on the MLP hidden activations before fc2 (Sub-LN, BEiT-3)
    patch_norm: bool = False  # norm on the patch tokens inside the patch embedding (AIMv2)
    pool_include_prefix: bool = False  # pooling also reads the class/register tokens
    patch_bias: bool = True  # bias on the patch projection (CLIP has none)
    layer_scale: float | None = None  # LayerScale init value; None disables LayerScale
    pre_norm: bool = False  # norm after embedding, before the blocks (CLIP's ln_pre)
    final_norm: bool = True  # norm after the blocks (or after pooling, see fc_norm)
    fc_norm: bool | None = None  # put the final norm after pooling; None: only for avg/max/avgmax pooling
    dynamic_img_size: bool = False  # accept any image size divisible by patch_size
    rope_temperature: float | None = None  # RoPE frequency base; None: the rope entry's default (axial 1e4, dinov3 100)
    rope_ref_grid: tuple[int, int] | None = None  # RoPE positions rescaled to this grid (EVA-02's pretraining grid)
    rope_grid_offset: float = 0.0  # added to every RoPE position (Perception Encoder: 1)
    rope_xy: bool = False  # RoPE coordinate channels ordered (x, y) instead of (y, x) (ROPE-ViT, Perception Encoder)
    rope_rescale: float | None = None  # training only: RoPE positions times one random factor in [1/R, R] (Sapiens2)
    pool_num_heads: int | None = None  # heads of attention pooling ('map'); None: num_heads (Perception Encoder: 8)
    pool_mlp_ratio: float | None = None  # MLP ratio of attention pooling ('map'); None: mlp_ratio
    # regularisation
    drop_rate: float = 0.0  # dropout before the classifier
    pos_drop_rate: float = 0.0  # dropout after adding position embeddings
    patch_drop_rate: float = 0.0  # training only: drop this fraction of patch tokens (FLIP)
    attn_drop_rate: float = 0.0  # dropout on attention weights
    proj_drop_rate: float = 0.0  # dropout after attention and MLP projections
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this rate at the last block

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int) and not isinstance(self.img_size, bool):  # timm's square shorthand
            object.__setattr__(self, "img_size", (self.img_size, self.img_size))
        for name in field_types(ViTSpec):  # TOML and JSON have no tuples: their lists stand for them
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_fields(self, FIELD_RANGES)
        for slot, table in SLOTS.items():  # aliases ("gap") -> the entry name ("avg")
            value = getattr(self, slot)
            canonical = tuple(map(table.canonical, value)) if isinstance(value, tuple) else table.canonical(value)
            object.__setattr__(self, slot, canonical)
        self._validate()

    def _validate(self) -> None:
        """Rules between fields; each field's own type and range are checked before (:data:`FIELD_RANGES`)."""
        def fail(name: str, problem: str) -> None:
            raise ValueError(f"ViTSpec.{name}: {problem}")

        if self.embed_dim % self.num_heads:
            fail("embed_dim", f"{self.embed_dim} is not divisible by num_heads={self.num_heads}; "
                 f"pick embed_dim a multiple of num_heads (head_dim = embed_dim / num_heads)")
        if any(s % self.patch_size for s in self.img_size) and not self.crop_remainder:
            fail("img_size", f"{self.img_size} is not divisible by patch_size={self.patch_size}; "
                 f"use a multiple of {self.patch_size} for each side, or crop_remainder=True to drop the rest")
        for slot, table in SLOTS.items():
            for name in self.distinct(slot):
                if name not in table:
                    fail(slot, f"unknown block {name!r}; {did_you_mean(name, table.known_names())}")
        for name in (*PER_LAYER_SLOTS, "kv_heads"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != self.depth:
                fail(name, f"has {len(value)} per-layer values but depth={self.depth}; give one value or {self.depth}")
        if self.kv_heads is not None:
            if "gqa" not in self.distinct("attn"):
                fail("kv_heads", "applies to grouped-query attention only; set attn='gqa' or leave kv_heads unset")
            bad = [h for h in self.distinct("kv_heads") if self.num_heads % h]
            if bad:
                fail("kv_heads", f"{bad[0]!r} does not divide num_heads={self.num_heads}; each query group needs "
                     f"the same number of heads, so use a divisor of {self.num_heads}")
        if self.pool == "token" and not self.class_token:
            fail("pool", "'token' reads the class token, but class_token=False; use pool='avg' or 'map'")
        if self.dist_token and (not self.class_token or self.pool != "token"):
            fail("dist_token", "needs class_token=True and pool='token' (DeiT reads both tokens)")
        if self.rope != "none" and (self.embed_dim // self.num_heads) % 4:
            fail("rope", f"2-D RoPE needs head_dim = embed_dim / num_heads divisible by 4, got "
                 f"{self.embed_dim // self.num_heads}")
        if self.rope != "none" and self.patch_drop_rate > 0:
            fail("patch_drop_rate", "dropping patch tokens would misalign the rotary positions; use rope='none'")
        if self.rope_rescale is not None and self.rope == "none":
            fail("rope_rescale", f"must be >= 1 (the largest scale factor) with a rope, or None; "
                 f"got {self.rope_rescale} with rope={self.rope!r}")
        for name in ("mlp_ratio", "pool_mlp_ratio"):
            ratio = getattr(self, name)
            if ratio is not None and self.embed_dim * ratio < 1:  # compared as floats: no overflow
                fail(name, f"gives an MLP of hidden width int({self.embed_dim} * {ratio}) = 0; "
                     f"use at least 1 / embed_dim")
        if self.pool_num_heads is not None and self.embed_dim % self.pool_num_heads:
            fail("pool_num_heads", f"must divide embed_dim={self.embed_dim}, got {self.pool_num_heads}")

    # derived quantities -------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (h, w) at ``img_size``."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) of an image size this model accepts; the error for one it does not says what to do."""
        p = self.patch_size
        if self.dynamic_img_size:
            if (height % p or width % p) and not self.crop_remainder:
                raise ValueError(f"image size {height}x{width} is not a multiple of patch_size={p}; "
                                 f"resize or pad each side to a multiple of {p}")
        elif (height, width) != self.img_size:
            raise ValueError(
                f"this model expects {self.img_size[0]}x{self.img_size[1]} images, got {height}x{width}; "
                f"resize the input, build the model with img_size=({height}, {width}), "
                f"or pass dynamic_img_size=True to accept any multiple of {p}"
            )
        return height // p, width // p

    @property
    def num_prefix_tokens(self) -> int:
        """Class + distillation + register tokens in front of the patch tokens."""
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    @property
    def use_fc_norm(self) -> bool:
        """Whether the final norm sits after pooling (``fc_norm``) instead of before (``norm``)."""
        return self.pool in ("avg", "max", "avgmax") if self.fc_norm is None else self.fc_norm

    def distinct(self, name: str) -> tuple[Any, ...]:
        """The values a per-layer field takes, without expanding one value to ``depth`` copies."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,)

    def layer_choices(self, name: str) -> tuple[Any, ...]:
        """The value of a per-layer field for every layer: the block name of a slot, or ``kv_heads``."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * self.depth

    # data round trip ----------------------------------------------------------------------------
    def replace(self, **changes: Any) -> ViTSpec:
        """A copy with ``changes`` applied and validated; unknown field names get the closest ones."""
        names = {f.name for f in dataclasses.fields(self)}
        for key in changes:
            if key not in names:
                raise ValueError(f"ViTSpec has no field {key!r}; {did_you_mean(key, names)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain, TOML/JSON-friendly dict (tuples as lists, None-valued fields left out)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTSpec:
        """Inverse of :meth:`to_dict`; unknown keys raise with the closest field names."""
        return cls().replace(**data)


def parse_value(text: str, field: str | None = None) -> Any:
    """A command-line value as the spec ``field`` wants it (see :func:`vitzoo.fields.parse_text`): a bool
    word only for a bool field, a number only for a number field, ``a,b,c`` a tuple (one per layer for
    per-layer slots). Without ``field``: a bool word, none, int, float, else the string; the spec's type
    check then refuses whatever does not fit the field it is given to."""
    return parse_text(text, field_types(ViTSpec).get(field, UNKNOWN_FIELD))


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"mlp=swiglu"`` -> ``("mlp", "swiglu")``; the field name is checked when the spec is built."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"expected FIELD=VALUE (e.g. mlp=swiglu or qk_norm=true), got {text!r}")
    return name.strip(), parse_value(value, name.strip())


# The range of each numeric field (of each element, for tuples); the types come from the annotations.
FIELD_RANGES: dict[str, Range] = {
    **dict.fromkeys(("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "kv_heads",
                     "rope_ref_grid", "rope_rescale", "pool_num_heads"), AT_LEAST_ONE),
    **dict.fromkeys(("num_classes", "reg_tokens"), NON_NEGATIVE),
    **dict.fromkeys(("mlp_ratio", "norm_eps", "layer_scale", "rope_temperature", "pool_mlp_ratio"), POSITIVE),
    **dict.fromkeys(("drop_rate", "pos_drop_rate", "patch_drop_rate", "attn_drop_rate", "proj_drop_rate",
                     "drop_path_rate"), RATE),
}
