"""A slot's value in a spec: an entry of the slot's table and the options set for it.

Written as a name (``"gqa"``), one name per layer (``["mhsa", "gqa"]``), or a table with the name and
options (``{"name": "gqa", "kv_heads": 2}``; per-layer slots take one value or one per layer for each
option). A table without ``name`` changes options of the entry already chosen. Options not set take the
entry's defaults and are not stored, so two ways of writing the same model give equal specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitzoo.blocks.options import BlockOptions, option_defaults, option_names
from vitzoo.blocks.table import BlockTable
from vitzoo.errors import did_you_mean
from vitzoo.fields import FieldTypeError, field_types, takes_tuple

PER_LAYER_SLOTS = ("attn", "mlp", "block")  # slots whose entry and options may differ per layer


@dataclass(frozen=True)
class Choice:
    """An entry name (or one per layer) and the options set for it, each one value or one per layer."""

    name: str | tuple[str, ...]
    options: tuple[tuple[str, Any], ...] = ()  # (option, value) pairs, sorted, defaults left out

    def names(self) -> tuple[str, ...]:
        """The distinct entry names, in order of first use."""
        return tuple(dict.fromkeys(self.name)) if isinstance(self.name, tuple) else (self.name,)

    def name_at(self, layer: int) -> str:
        return self.name[layer] if isinstance(self.name, tuple) else self.name

    def get(self, option: str, default: Any = None) -> Any:
        """The value set for ``option`` (one per layer if so given), else ``default``."""
        return dict(self.options).get(option, default)

    def to_data(self) -> str | list | dict[str, Any]:
        """Plain TOML/JSON data: the name alone when no option is set, lists for per-layer values."""
        name = list(self.name) if isinstance(self.name, tuple) else self.name
        if not self.options:
            return name
        return {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options}}


def as_data(value: Any) -> Any:
    """A slot value as plain data (a name, a list of names or a table), for merging changes into it."""
    return value.to_data() if isinstance(value, Choice) else value


def merge(current: Any, change: Any) -> Any:
    """``change`` applied to a slot (or group) value in data form: a table without ``name`` keeps the
    current entry and updates its options; anything else replaces the value."""
    if not isinstance(change, dict) or "name" in change:
        return change
    current = as_data(current)
    base = current if isinstance(current, dict) else {"name": current}
    return {**base, **change}


def _per_layer(table: BlockTable, option: str, value: Any, names: tuple[str, ...]) -> bool:
    """Whether a tuple value holds one value per layer, not one value of a tuple-typed option."""
    if table.slot not in PER_LAYER_SLOTS:
        return False
    for name in names:
        cls = table.options_class(name)
        if cls is not None and option in option_names(cls) and takes_tuple(field_types(cls)[option]):
            return False
    return True


def make_choice(table: BlockTable, value: Any, depth: int) -> Choice:
    """A checked, canonical :class:`Choice` from a slot value in any of its spellings."""
    slot = table.slot
    per_layer = slot in PER_LAYER_SLOTS
    if isinstance(value, Choice):
        value = value.to_data()
    data = dict(value) if isinstance(value, dict) else {"name": value}
    name = data.pop("name", None)
    if isinstance(name, list | tuple) and per_layer:
        name = tuple(name)
        _check_length(slot, "", name, depth)
        if any(not isinstance(n, str) for n in name):
            raise FieldTypeError(f"ViTSpec.{slot}: expected block names, got {list(name)!r}")
        name = tuple(table.canonical(n) for n in name)
    elif isinstance(name, str):
        name = table.canonical(name)
    else:
        kind = "a block name or one per layer" if per_layer else "a block name"
        raise FieldTypeError(f"ViTSpec.{slot}: expected {kind} (or a table with 'name' and options), got {name!r}")
    choice = Choice(name)
    for entry in choice.names():
        if entry not in table:
            raise ValueError(f"ViTSpec.{slot}: unknown block {entry!r}; {did_you_mean(entry, table.known_names())}")
    options = {}
    for option, setting in data.items():
        for entry in choice.names():
            declared = option_names(table.options_class(entry))
            if option not in declared:
                takes = f"its options: {', '.join(declared)}" if declared else "it takes no options"
                raise ValueError(f"ViTSpec.{slot}: block {entry!r} has no option {option!r}; {takes} "
                                 f"(docs/blocks.md lists every block's options)")
        if isinstance(setting, list):
            setting = tuple(setting)
        if isinstance(setting, tuple) and _per_layer(table, option, setting, choice.names()):
            _check_length(slot, f".{option}", setting, depth)
        defaults = [option_defaults(table.options_class(entry))[option] for entry in choice.names()]
        if not all(type(d) is type(setting) and d == setting for d in defaults):  # 0 is kept next to 0.0
            options[option] = setting
    return Choice(name, tuple(sorted(options.items())))


def _check_length(slot: str, option: str, values: tuple, depth: int) -> None:
    if len(values) != depth:
        raise ValueError(f"ViTSpec.{slot}{option}: has {len(values)} per-layer values but depth={depth}; "
                         f"give one value or {depth}")


def layer_options(table: BlockTable, choice: Choice, layer: int) -> tuple[str, BlockOptions | None]:
    """The entry name of ``layer`` and its options instance (None for an entry without options)."""
    name = choice.name_at(layer)
    cls = table.options_class(name)
    if cls is None:
        return name, None
    values = {}
    for option, value in choice.options:
        per_layer = isinstance(value, tuple) and _per_layer(table, option, value, choice.names())
        values[option] = value[layer] if per_layer else value
    return name, cls(**values)


def first_layers(table: BlockTable, choice: Choice, depth: int) -> Choice:
    """``choice`` for a model cut to its first ``depth`` blocks: per-layer names and values shortened."""
    name = choice.name[:depth] if isinstance(choice.name, tuple) else choice.name
    options = tuple(
        (k, v[:depth] if isinstance(v, tuple) and _per_layer(table, k, v, choice.names()) else v)
        for k, v in choice.options
    )
    return Choice(name, options)


def varies_per_layer(table: BlockTable, choice: Choice) -> bool:
    """Whether layers differ in entry or options (then each layer's options are built on their own)."""
    return isinstance(choice.name, tuple) or any(
        isinstance(v, tuple) and _per_layer(table, k, v, choice.names()) for k, v in choice.options
    )
