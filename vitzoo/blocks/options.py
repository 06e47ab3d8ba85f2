"""Options of a block entry: a small frozen dataclass declared next to the block and given to it on build.

A slot value in a spec is an entry name with options (``attn = { name = "gqa", kv_heads = 2 }``). The
entry declares which options it takes by registering an options class (``ATTENTIONS.register("gqa",
GroupedQueryAttention, options=GroupedQueryOptions)``); the table builds the block with
``options=<instance>``. Each option is a typed field declared with :func:`vitzoo.fields.described`: its
default, one line saying what it does (``docs/blocks.md`` shows it) and its range, checked on
construction as every config's are; rules that involve the model's sizes go in :meth:`check`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vitzoo.fields import check_fields


@dataclass(frozen=True)
class BlockOptions:
    """Base of every options class: checks each field's type and range on construction."""

    def __post_init__(self) -> None:
        check_fields(self)

    def check(self, spec: Any) -> None:
        """Refuse (ValueError) values that do not fit the model's sizes; ``spec`` is the :class:`ViTSpec`."""


def option_names(cls: type[BlockOptions] | None) -> tuple[str, ...]:
    """The options an entry takes (none without an options class)."""
    return () if cls is None else tuple(f.name for f in dataclasses.fields(cls))


def option_defaults(cls: type[BlockOptions] | None) -> dict[str, Any]:
    """Each option's default value."""
    return {} if cls is None else {f.name: f.default for f in dataclasses.fields(cls)}

