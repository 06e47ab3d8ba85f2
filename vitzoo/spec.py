"""The one description of a Vision Transformer: model-wide choices are fields here, and each block's own
options live on its slot (``attn = { name = "gqa", kv_heads = 2 }``, see :mod:`vitzoo.choice`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vitzoo.blocks import SLOTS
from vitzoo.blocks.options import BlockOptions
from vitzoo.choice import (
    PER_LAYER_SLOTS,
    Choice,
    first_layers,
    layer_options,
    make_choice,
    merge,
    varies_per_layer,
)
from vitzoo.errors import did_you_mean
from vitzoo.fields import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    RATE,
    check_fields,
    described,
    field_types,
    parse_text,
    takes_tuple,
)

FINAL_NORMS = ("auto", "tokens", "pooled", "none")
# What a command-line value may be when its field is not known.
UNKNOWN_FIELD = bool | int | float | str | None | tuple[bool | int | float | str | None, ...]


@dataclass(frozen=True)
class Dropouts:
    """Dropout rates of the whole model (timm's ``*_drop_rate`` arguments)."""

    head: float = described(0.0, "before the classifier (timm's drop_rate)", RATE)
    pos: float = described(0.0, "after adding position embeddings", RATE)
    patch: float = described(0.0, "training only: drop this fraction of patch tokens (FLIP)", RATE)
    attn: float = described(0.0, "on attention weights", RATE)
    proj: float = described(0.0, "after attention and MLP projections", RATE)
    path: float = described(0.0, "stochastic depth, rising linearly to this rate at the last block", RATE)

    def __post_init__(self) -> None:
        check_fields(self)


GROUPS = {"drop": Dropouts}  # top-level fields that hold a small dataclass of their own


@dataclass(frozen=True)
class ViTSpec:
    """Everything that makes two Vision Transformers different.

    Slot fields (``patch_embed``, ``pos_embed``, ``attn``, ``mlp``, ``norm``, ``block``, ``pool``,
    ``rope``, ``attn_bias``) name entries of the block tables in :mod:`vitzoo.blocks` with their options; ``attn``,
    ``mlp`` and ``block`` also take one name, and one value of each option, per layer. Specs are plain
    data: they round-trip through :meth:`to_dict` / :meth:`from_dict` (and so TOML), and checkpoints
    carry them.
    """

    # input and output
    img_size: tuple[int, int] = described((224, 224), "(H, W) the position table is laid out for", AT_LEAST_ONE)
    patch_size: int = described(16, "square patch side in pixels", AT_LEAST_ONE)
    in_chans: int = described(3, "image channels", AT_LEAST_ONE)
    num_classes: int = described(1000, "classifier outputs; 0 means no head (pooled features out)", NON_NEGATIVE)
    dynamic_img_size: bool = described(False, "accept any image size divisible by patch_size")
    crop_remainder: bool = described(
        False, "drop pixels past the last whole patch instead of refusing (timm so400m/14 at 384)")
    # width and depth
    embed_dim: int = described(768, "token width", AT_LEAST_ONE)
    depth: int = described(12, "number of encoder blocks", AT_LEAST_ONE)
    num_heads: int = described(12, "attention heads per block", AT_LEAST_ONE)
    mlp_ratio: float = described(4.0, "MLP hidden width / embed_dim", POSITIVE)
    # blocks, by name in the slot tables, with their options
    patch_embed: Choice = described(Choice("linear"), "image -> patch tokens")
    pos_embed: Choice = described(Choice("learned"), "learned | sincos2d | none")
    attn: Choice = described(Choice("mhsa"), "token mixer")
    mlp: Choice = described(Choice("gelu"), "channel mixer")
    norm: Choice = described(Choice("layernorm"), "every norm in the model")
    block: Choice = described(Choice("prenorm"), "residual wiring")
    pool: Choice = described(Choice("token"), "readout: token | avg | max | avgmax | map | none")
    rope: Choice = described(
        Choice("none"), "rotary positions on q/k inside attention: none | axial (EVA-02) | dinov3 | mixed")
    attn_bias: Choice = described(
        Choice("none"), "one bias on every block's attention logits, computed once per forward: none | relpos_mlp | "
        "relpos_bias (timm's shared_rel_pos)")
    # prefix tokens
    class_token: bool = described(True, "learned [CLS] token in front")
    dist_token: bool = described(False, "DeiT distillation token after [CLS], read by a second head")
    reg_tokens: int = described(0, "register tokens after the class/distillation tokens", NON_NEGATIVE)
    # norms outside the blocks
    pre_norm: bool = described(False, "norm after embedding, before the blocks (CLIP's ln_pre)")
    final_norm: str = described(
        "auto", "after the blocks: tokens | pooled (after pooling) | none | auto (pooled for avg/max)")
    # regularisation
    drop: Dropouts = described(Dropouts(), "dropout rates: head, pos, patch, attn, proj, path")

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int) and not isinstance(self.img_size, bool):  # timm's square shorthand
            object.__setattr__(self, "img_size", (self.img_size, self.img_size))
        for name in field_types(ViTSpec):  # TOML and JSON have no tuples: their lists stand for them
            if isinstance(getattr(self, name), list) and name not in SLOTS:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, group in GROUPS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, _make_group(name, group, value))
        check_fields(self, skip=tuple(SLOTS))
        for slot, table in SLOTS.items():  # a table without a name sets options of the default entry
            object.__setattr__(self, slot, make_choice(table, merge(SLOT_DEFAULTS[slot], getattr(self, slot)),
                                                       self.depth))
        self._validate()

    def _validate(self) -> None:
        """Rules between fields; each field's own type and range are checked before (declared on the field)."""
        def fail(name: str, problem: str) -> None:
            raise ValueError(f"ViTSpec.{name}: {problem}")

        if self.embed_dim % self.num_heads:
            fail("embed_dim", f"{self.embed_dim} is not divisible by num_heads={self.num_heads}; "
                 f"pick embed_dim a multiple of num_heads (head_dim = embed_dim / num_heads)")
        if any(s % self.patch_size for s in self.img_size) and not self.crop_remainder:
            fail("img_size", f"{self.img_size} is not divisible by patch_size={self.patch_size}; "
                 f"use a multiple of {self.patch_size} for each side, or crop_remainder=True to drop the rest")
        if self.final_norm not in FINAL_NORMS:
            fail("final_norm", f"{self.final_norm!r} is not a placement; {did_you_mean(self.final_norm, FINAL_NORMS)}")
        if self.pool.name == "token" and not self.class_token:
            fail("pool", "'token' reads the class token, but class_token=False; use pool='avg' or 'map'")
        if self.dist_token and (not self.class_token or self.pool.name != "token"):
            fail("dist_token", "needs class_token=True and pool='token' (DeiT reads both tokens)")
        if self.rope.name != "none" and self.drop.patch > 0:
            fail("drop.patch", "dropping patch tokens would misalign the rotary positions; use rope='none'")
        if self.attn_bias.name != "none" and self.drop.patch > 0:
            fail("drop.patch", "dropping patch tokens would misalign the attention bias; use attn_bias='none'")
        if self.embed_dim * self.mlp_ratio < 1:  # compared as floats: no overflow
            fail("mlp_ratio", f"gives an MLP of hidden width int({self.embed_dim} * {self.mlp_ratio}) = 0; "
                 f"use at least 1 / embed_dim")
        for slot, table in SLOTS.items():  # each distinct (entry, options) once: its types, ranges and rules
            choice, checked = getattr(self, slot), set()
            for i in range(self.depth) if varies_per_layer(table, choice) else (0,):
                try:
                    name, options = layer_options(table, choice, i)
                    if options is not None and (name, options) not in checked:
                        checked.add((name, options))
                        options.for_model(self).check(self)
                except ValueError as err:
                    owner = getattr(table.options_class(choice.name_at(i)), "__name__", "")
                    raise _spec_error(err, owner, slot, f"ViTSpec.{slot} ({choice.name_at(i)})") from None

    # derived quantities -------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (h, w) at ``img_size``."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Class + distillation + register tokens in front of the patch tokens."""
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    @property
    def positioned_prefix(self) -> int:
        """Prefix tokens that have rows in the position table (none with ``pos_embed.prefix=false``)."""
        return self.num_prefix_tokens if self.get("pos_embed.prefix") is not False else 0

    @property
    def final_norm_at(self) -> str:
        """Where the final norm sits: ``tokens`` (timm's ``norm``), ``pooled`` (``fc_norm``) or ``none``."""
        if self.final_norm == "auto":
            return "pooled" if self.pool.name in ("avg", "max", "avgmax") else "tokens"
        return self.final_norm

    def layer(self, slot: str, index: int = 0) -> tuple[str, BlockOptions | None]:
        """The entry name and options instance of ``slot`` at block ``index`` (0 for model-wide slots)."""
        return layer_options(SLOTS[slot], getattr(self, slot), index)

    def first_layers(self, depth: int) -> dict[str, Any]:
        """The changes that cut this spec to its first ``depth`` blocks (per-layer values shortened)."""
        return {"depth": depth, **{slot: first_layers(SLOTS[slot], getattr(self, slot), depth)
                                   for slot in PER_LAYER_SLOTS}}

    def get(self, path: str) -> Any:
        """A value by dotted path: ``"depth"``, ``"drop.path"``, ``"attn.kv_heads"`` (a slot option: the value
        set, else the entry's default; None when the entry does not have it)."""
        top, _, option = path.partition(".")
        value = getattr(self, top)
        if not option:
            return value
        if top in GROUPS:
            return getattr(value, option)
        options = self.layer(top)[1]
        return value.get(option, getattr(options, option, None))

    # data round trip ----------------------------------------------------------------------------
    def replace(self, **changes: Any) -> ViTSpec:
        """A copy with ``changes`` applied and validated. A key is a field (``depth=6``, ``attn="gqa"``: another
        entry with its default options, ``attn={"qk_norm": True}``: one option of the current entry) or a
        dotted path (``**{"attn.kv_heads": 2}``, ``**{"drop.path": 0.1}``); unknown names get the closest ones."""
        return ViTSpec(**merge_fields(self.to_dict(), nest(changes)))

    def to_dict(self) -> dict[str, Any]:
        """Plain, TOML/JSON-friendly dict (tuples as lists, None-valued fields and default dropouts left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Choice):
                out[f.name] = value.to_data()
            elif f.name in GROUPS:
                default = GROUPS[f.name]()
                changed = {k: v for k, v in dataclasses.asdict(value).items()
                           if type(v) is not type(getattr(default, k)) or v != getattr(default, k)}
                if changed:
                    out[f.name] = changed
            elif value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTSpec:
        """Inverse of :meth:`to_dict`; unknown keys raise with the closest field names. Files written by an
        earlier vitzoo go through :func:`vitzoo.migrate.spec_from_saved` instead."""
        return cls().replace(**data)


FIELDS_LISTED = "docs/blocks.md, which lists every field"
# Each slot's default entry, read once from the fields: what a slot table without a name adds options to.
SLOT_DEFAULTS: dict[str, Choice] = {f.name: f.default for f in dataclasses.fields(ViTSpec) if f.name in SLOTS}


def nest(changes: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys folded into their field: ``{"attn": "gqa", "attn.kv_heads": 2}`` ->
    ``{"attn": {"name": "gqa", "kv_heads": 2}}``; unknown fields raise with the closest names."""
    names = [f.name for f in dataclasses.fields(ViTSpec)]
    out: dict[str, Any] = {}
    for key in sorted(changes, key=lambda k: "." in k):  # whole values first, then the options set on them
        top, dot, option = key.partition(".")
        if top not in names:
            hint = _moved(top) or did_you_mean(top, names, listed=FIELDS_LISTED)
            raise ValueError(f"ViTSpec has no field {top!r}; {hint}")
        if not dot:
            out[key] = changes[key]
        elif top not in (*SLOTS, *GROUPS):
            raise ValueError(f"ViTSpec.{top} has no options; set it with {top}=VALUE")
        else:
            out[top] = merge(out[top], {option: changes[key]}) if top in out else {option: changes[key]}
    return out


def merge_fields(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Spec data with ``changes`` applied: a slot or group table without ``name`` updates the options
    already there (see :func:`vitzoo.choice.merge`); any other value replaces the field."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if key in out and key in (*SLOTS, *GROUPS) else value
    return out


def set_paths(changes: dict[str, Any]) -> set[str]:
    """The fields and dotted option paths a set of changes sets (``{"attn": {"name": "gqa", "kv_heads": 2}}``
    -> ``{"attn", "attn.kv_heads"}``)."""
    out = set()
    for key, value in nest(changes).items():
        if isinstance(value, dict):
            out.update(f"{key}.{option}" for option in value if option != "name")
            if "name" in value:
                out.add(key)
        else:
            out.add(key)
    return out


def _moved(name: str) -> str:
    """Where a field of the flat spec of vitzoo 0.1 lives now, as a sentence (empty if it is not one)."""
    from vitzoo.migrate import V1_FIELDS

    if name not in V1_FIELDS:
        return ""
    path = V1_FIELDS[name][1]
    top, _, option = path.partition(".")
    return (f"{name!r} is now {path!r}: pass {top}={{{option!r}: ...}} in Python, {top} = {{ {option} = ... }} "
            f"in TOML, --set {path}=... on the command line")


def _make_group(name: str, group: type, data: dict[str, Any]) -> Any:
    fields = [f.name for f in dataclasses.fields(group)]
    for key in data:
        if key not in fields:
            raise ValueError(f"ViTSpec.{name} has no field {key!r}; {did_you_mean(key, fields, listed=FIELDS_LISTED)}")
    try:
        return group(**data)
    except ValueError as err:
        raise _spec_error(err, group.__name__, name, f"ViTSpec.{name}") from None


def _spec_error(err: ValueError, owner: str, path: str, where: str) -> ValueError:
    """A field check's refusal as the spec names the field: "AttentionOptions.qk_norm: ..." of the ``attn``
    slot reads "ViTSpec.attn.qk_norm: ..."; any other message is prefixed with ``where``."""
    message = str(err)
    if owner and message.startswith(f"{owner}."):
        return type(err)(f"ViTSpec.{path}.{message[len(owner) + 1:]}")
    return type(err)(f"{where}: {message}")


def value_type(field: str) -> Any:
    """The annotation a command-line value for ``field`` (or a dotted option path) is parsed to fit."""
    top, dot, option = field.partition(".")
    if top in SLOTS and not dot:
        return str | tuple[str, ...] if top in PER_LAYER_SLOTS else str
    if top in GROUPS and dot:
        return field_types(GROUPS[top]).get(option, UNKNOWN_FIELD)
    if top in SLOTS:
        table = SLOTS[top]
        for name in table:
            cls = table.options_class(name)
            if cls is not None and option in field_types(cls):
                annotation = field_types(cls)[option]
                per_layer = top in PER_LAYER_SLOTS and not takes_tuple(annotation)
                return annotation | tuple[annotation, ...] if per_layer else annotation
        return UNKNOWN_FIELD
    return field_types(ViTSpec).get(field, UNKNOWN_FIELD)


def parse_value(text: str, field: str | None = None) -> Any:
    """A command-line value as the spec ``field`` (or dotted option path) wants it (see
    :func:`vitzoo.fields.parse_text`): a bool word only for a bool, a number only for a number, ``a,b,c`` a
    tuple (one per layer for per-layer slots and their options). Without ``field``: a bool word, none, int,
    float, else the string; the spec's type check then refuses whatever does not fit."""
    return parse_text(text, UNKNOWN_FIELD if field is None else value_type(field))


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"mlp=swiglu"`` -> ``("mlp", "swiglu")``, ``"attn.kv_heads=2"`` -> ``("attn.kv_heads", 2)``; the names
    are checked when the spec is built."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"expected FIELD=VALUE (e.g. mlp=swiglu or attn.qk_norm=true), got {text!r}")
    return name.strip(), parse_value(value, name.strip())

